"""Fused Triton kernels for batch, instance, group and layer norm with an optional activation (forward, eval,
backward).

The same two functions as :mod:`normlab.torch_ops`, with the same contract, plus :func:`supports`.
:mod:`normlab.backend` chooses this module for CUDA tensors when Triton imports and :func:`supports` is True.
Importing ``normlab`` never imports this package; importing this package imports Triton.

Plans whose statistics run along contiguous rows (per sample, ``G = 1``, ``R = 1``: layer norm, and group norm of
an ``(N, C)`` input with one group) take the row path (:func:`normlab.kernels.launch.layer_fwd`); the others
take the ``(N, C, R)`` path.
"""

from __future__ import annotations

import os

import torch

from normlab.kernels import launch
from normlab.spec import Plan

__all__ = ["backward", "forward", "supports"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(x: torch.Tensor, p: Plan) -> bool:
    """Whether the kernels handle normalizing ``x`` under plan ``p`` (else the torch path should)."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        on_device
        and x.dtype in _DTYPES
        and (x.dim() >= 2 or _rows(p))
        and x.numel() > 0
        and tuple(x.shape) == p.shape
    )


def _rows(p: Plan) -> bool:
    """The statistics run along contiguous rows of ``K`` values: one per sample, one group, no positions."""
    return not p.pool_batch and p.G == 1 and p.R == 1


def _flat32(t: torch.Tensor) -> torch.Tensor:
    """A statistic as the kernels read it: flat, contiguous float32."""
    return t.reshape(-1).to(torch.float32).contiguous()


def _act(activation: str | None) -> str:
    return activation or ""


def forward(x, w, b, p: Plan, eps: float, activation=None, placement="before", stats=None):
    """Normalize ``x`` (shape ``p.shape``); returns ``(y, mean, var)``. Same contract as
    :func:`normlab.torch_ops.forward`: y like x (dtype and memory format), float32 statistics of shape
    ``p.stat_shape`` (for given ``stats``: those stats)."""
    after = placement == "after"
    if _rows(p):
        given = None if stats is None else tuple(_flat32(s) for s in stats)
        y, mean, var = launch.layer_fwd(x, w, b, p.N, p.K, float(eps), _act(activation), after, given)
        return y, mean.reshape(p.stat_shape), var.reshape(p.stat_shape)
    common = (p.G, p.K, not p.pool_batch, float(eps), _act(activation), after)
    if stats is None:
        y, mean, var = launch.norm_fwd(x, w, b, *common)
    else:
        mean, var = _flat32(stats[0]), _flat32(stats[1])
        y = launch.norm_apply(x, w, b, mean, var, *common)
    return y, mean.reshape(p.stat_shape), var.reshape(p.stat_shape)


def backward(dy, x, w, b, mean, rstd, p: Plan, activation=None, placement="before", batch_stats=True):
    """Gradients of :func:`forward`: ``(dx, dw, db)``, dw and db None when w and b are None (flat, in their
    dtypes). Same contract as :func:`normlab.torch_ops.backward`."""
    mean, rstd = _flat32(mean), _flat32(rstd)
    act, after = _act(activation), placement == "after"
    if _rows(p):
        dx, dw, db = launch.layer_bwd(dy, x, w, b, mean, rstd, p.N, p.K, act, after, bool(batch_stats))
    else:
        dx, dw, db = launch.norm_bwd(dy, x, w, b, mean, rstd, p.G, p.K, not p.pool_batch, act, after,
                                     bool(batch_stats))  # fmt: skip
    return dx, (None if w is None else dw), (None if b is None else db)
