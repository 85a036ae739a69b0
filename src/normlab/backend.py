"""Which implementation runs a norm: the one place that chooses between the backends.

``NORMLAB_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): the Triton kernels for CUDA tensors when Triton imports and the kernels support the case;
  for float32/float64 CPU tensors the native C++ kernels (:mod:`normlab.native`; faster than the numba loops on
  every case ``benchmarks/crossover.py`` measures at one thread, and at two but for the 4M-value corners, within
  their run-to-run spread), or, where they cannot be built (no C++ compiler), ATen's own
  kernels on shifted input (:mod:`normlab.aten_ops`) where that benchmark measured them faster than the numba
  loops (:func:`normlab.aten_ops.pays`) and the numba loops elsewhere; the torch path otherwise (half precision on
  the CPU, an empty batch);
- ``native``: the native kernels wherever :mod:`normlab.native` supports the case (raises if they cannot be built;
  elsewhere, as ``auto``);
- ``aten``: ATen's kernels on shifted input wherever :mod:`normlab.aten_ops` supports the case (elsewhere, as
  ``auto`` without the native kernels);
- ``torch``: always the torch path (:mod:`normlab.torch_ops`);
- ``numba``: always the numba loops (:mod:`normlab.numba_ops`);
- ``triton``: always the kernels, on any device (CPU tensors run under ``TRITON_INTERPRET=1``).

A forced choice that cannot handle the case raises instead of silently falling back. Every backend module has
``forward``, ``backward``, ``update_running_stats`` and ``supports`` with the contract in :mod:`normlab.torch_ops`;
:mod:`normlab.native` and :mod:`normlab.aten_ops` are no such modules: autograd differentiates them through C++
nodes, so :func:`graph_path` is asked first. Under ``torch.compile`` the norms are custom ops that run
:func:`select`'s backend.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from normlab import aten_ops, native, torch_ops
from normlab.spec import Call, Plan, Running

CHOICES = ("auto", "torch", "numba", "triton", "aten", "native")
_MODULES = {"numba": ("normlab.numba_ops", "numba"), "triton": ("normlab.kernels", "triton")}


@functools.cache
def _load(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(_MODULES[name][0])
    except ImportError:
        return None


@functools.cache
def _parse(value: str | bytes | None) -> str:
    value = (os.fsdecode(value) if value is not None else "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"NORMLAB_BACKEND must be one of {CHOICES}, got {value!r}")
    return value


# CPython keeps os.environ's values in the dict os.environ._data, under encoded keys, and os.environ[...] = v (as
# monkeypatch.setenv) updates it: one dict lookup reads the variable without os.environ.get's encode and decode
# (0.05 µs instead of 0.9, on every norm call). Elsewhere, os.environ.get.
_ENVIRON = getattr(os.environ, "_data", None)
_KEY = os.environ.encodekey("NORMLAB_BACKEND") if _ENVIRON is not None and hasattr(os.environ, "encodekey") else None


def choice() -> str:
    """The backend asked for by ``NORMLAB_BACKEND``."""
    if _KEY is not None:
        return _parse(_ENVIRON.get(_KEY))
    return _parse(os.environ.get("NORMLAB_BACKEND"))


def wants_grad(x: torch.Tensor, w, b) -> bool:
    """Whether autograd will want a gradient of a norm of ``x`` with weight ``w`` and bias ``b`` (a training step
    rather than a forward alone)."""
    return torch.is_grad_enabled() and (
        x.requires_grad or (w is not None and w.requires_grad) or (b is not None and b.requires_grad)
    )


def graph_path(x: torch.Tensor, w, b, call: Call, stats=None, running: Running | None = None) -> ModuleType | None:
    """The path autograd differentiates through C++ nodes that normalizes ``x`` for this call, if one does: the
    native kernels (:mod:`normlab.native`) or ATen's kernels on shifted input (:mod:`normlab.aten_ops`), each with
    ``norm(x, w, b, call, stats, running)``; None for the backends of :func:`select`."""
    want = choice()
    if (want == "auto" or want == "native") and native.supports(x, call, w, b, stats, running):
        if want == "native" or native.available():  # forced but not built: its norm raises, naming why
            return native
    if want in ("auto", "aten") and aten_ops.supports(x, call, stats, running):
        if want == "aten" or aten_ops.pays(x, call, wants_grad(x, w, b)):
            return aten_ops
    return None


def select(x: torch.Tensor, p: Plan) -> ModuleType:
    """The backend module that will normalize ``x`` under plan ``p``."""
    want = choice()
    if want == "torch":
        return torch_ops
    if want in ("auto", "aten", "native"):
        # no Triton import for CPU tensors, no numba import for CUDA ones
        impl = _load("triton" if x.is_cuda else "numba")
        return impl if impl is not None and impl.supports(x, p) else torch_ops
    impl = _load(want)
    if impl is None:
        package = _MODULES[want][1]
        raise RuntimeError(f"NORMLAB_BACKEND={want}, but {_MODULES[want][0]} could not be imported "
                           f"(is {package} installed?)")
    if not impl.supports(x, p):
        raise RuntimeError(
            f"NORMLAB_BACKEND={want}, but it does not support {p.kind} norm of a {x.dtype} tensor "
            f"of shape {tuple(x.shape)} on {x.device}"
        )
    return impl
