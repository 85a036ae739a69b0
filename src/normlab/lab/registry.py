"""The experiments by name: every module of :mod:`normlab.lab.experiments` is imported once and registers its own.

A new experiment is a new file in ``src/normlab/lab/experiments/`` whose :class:`~normlab.lab.experiment.Experiment`
subclass is decorated with :func:`register`; nothing else lists it. ``normlab --help``, ``normlab NAME`` and
``normlab plot`` read :func:`experiments`.
"""

from __future__ import annotations

import importlib
import pkgutil

from normlab.lab.experiment import Experiment

_REGISTRY: dict[str, Experiment] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: add an instance of ``cls`` under ``cls.name``; a second class with that name is an error."""
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise ValueError(f"two experiments are named {cls.name!r}: {type(_REGISTRY[cls.name]).__qualname__} and "
                         f"{cls.__qualname__}")
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    from normlab.lab import experiments

    for mod in pkgutil.iter_modules(experiments.__path__):
        importlib.import_module(f"{experiments.__name__}.{mod.name}")


def experiments() -> dict[str, Experiment]:
    """Every registered experiment by name, in ``normlab --help`` order (``order``, then name)."""
    _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


def get(name: str) -> Experiment:
    """The experiment ``name``; ValueError listing the known ones otherwise."""
    known = experiments()
    if name not in known:
        raise ValueError(f"no experiment named {name!r}; known: {', '.join(known)}")
    return known[name]
