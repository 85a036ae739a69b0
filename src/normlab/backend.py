"""Which implementation runs a norm: the one place that chooses between the torch path and the Triton kernels.

``NORMLAB_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): the Triton kernels for CUDA tensors when Triton imports and the kernels support the case,
  the torch path otherwise;
- ``torch``: always the torch path (:mod:`normlab.torch_ops`);
- ``triton``: always the kernels, on any device (CPU tensors run under ``TRITON_INTERPRET=1``); a case the
  kernels do not support raises instead of silently falling back.

Both backends expose ``forward(x, w, b, p, eps, activation, placement, stats) -> (y, mean, var)`` and
``backward(dy, x, w, b, mean, rstd, p, activation, placement, batch_stats) -> (dx, dw, db)``.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from normlab import torch_ops
from normlab.spec import Plan

CHOICES = ("auto", "torch", "triton")


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        return importlib.import_module("normlab.kernels")
    except ImportError:
        return None


def choice() -> str:
    """The backend asked for by ``NORMLAB_BACKEND``."""
    value = os.environ.get("NORMLAB_BACKEND", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"NORMLAB_BACKEND must be one of {CHOICES}, got {value!r}")
    return value


def select(x: torch.Tensor, p: Plan) -> ModuleType:
    """The backend module that will normalize ``x`` under plan ``p``."""
    want = choice()
    if want == "torch" or (want == "auto" and not x.is_cuda):  # auto: no Triton import for CPU tensors
        return torch_ops
    kernels = _kernels()
    if want == "triton":
        if kernels is None:
            raise RuntimeError(
                "NORMLAB_BACKEND=triton, but normlab.kernels could not be imported (is triton installed?)"
            )
        if not kernels.supports(x, p):
            raise RuntimeError(
                f"NORMLAB_BACKEND=triton, but the kernels do not support {p.kind} norm of a {x.dtype} tensor "
                f"of shape {tuple(x.shape)} on {x.device}"
            )
        return kernels
    return kernels if kernels is not None and kernels.supports(x, p) else torch_ops
