"""Fused Triton kernels for batch, instance, group and layer norm with an optional activation (forward, eval,
backward).

The same functions as :mod:`normlab.torch_ops` (``forward``, ``backward``, ``update_running_stats``), with the same
contract, plus :func:`supports`. The kernels produce ``rstd = 1 / sqrt(var + eps)`` with the output, for the input's
own statistics and for given ones alike.
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
from normlab.spec import Call, Plan, Running
from normlab.torch_ops import is_channels_last, update_running_stats

__all__ = ["backward", "forward", "supports", "update_running_stats"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32 = 2**31 - 1
_LIMIT = _INT32 - 2**16  # room for the padding of a tile past the last value
_GRID_Y = 65535  # CUDA's limit on a grid's second dimension


def supports(x: torch.Tensor, p: Plan) -> bool:
    """Whether the kernels handle normalizing ``x`` under plan ``p`` (else the torch path should)."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (
        on_device
        and x.dtype in _DTYPES
        and (x.dim() >= 2 or _rows(p))
        and x.numel() > 0
        and tuple(x.shape) == p.shape
        and _fits_int32(x, p)
    )


def _fits_int32(x: torch.Tensor, p: Plan) -> bool:
    """Whether the kernels' int32 offsets and their grids fit: the values of one sample (``c * s_c``), the
    positions of the whole batch (row blocks, and ``r0`` when the batch is folded into the positions), the partial
    sums, and at most 65535 programs along the channels (the grid's second dimension). Larger inputs take the torch
    path (int64 offsets everywhere would cost registers in every kernel)."""
    if x.numel() // max(p.N, 1) > _LIMIT:
        return False
    if _rows(p):  # partial sums of dw, db: (2, P, K), addressed in int32
        return p.N <= _LIMIT and 2 * launch.row_plan_of(p.N, p.K, x.device).P * p.K <= _INT32
    lp = launch.plan_of(x, p.G, p.K, p.pool_batch, is_channels_last(x))
    g = lp.g
    return g.N * g.R <= _LIMIT and lp.grid_c <= _GRID_Y and 3 * g.out * g.C * lp.T <= _INT32


def _rows(p: Plan) -> bool:
    """The statistics run along contiguous rows of ``K`` values: one per sample, one group, no positions."""
    return not p.pool_batch and p.G == 1 and p.R == 1


def _stat32(t: torch.Tensor, p: Plan) -> torch.Tensor:
    """A statistic as the kernels read it: the ``p.stat_shape`` values, flat, contiguous float32 (a ``(C,)`` one
    given for per-sample statistics, as instance norm's running buffers, repeated for every sample)."""
    if t.dtype == torch.float32 and t.numel() == p.stat_shape[0] * p.G:  # the forward's own: a view, no op
        return t.reshape(-1)
    t = t.to(torch.float32).reshape(-1, p.G)
    return t.expand(p.stat_shape).contiguous().reshape(-1)


def _activation(call: Call) -> launch.Activation:
    return launch.activation_of(call.activation, call.negative_slope, call.placement == "after")


def forward(x, w, b, call: Call, stats=None, running: Running | None = None):
    """Normalize ``x`` (shape ``call.plan.shape``); returns ``(y, mean, rstd, var)``. Same contract as
    :func:`normlab.torch_ops.forward`: y like x (dtype and memory format), float32 statistics of shape
    ``p.stat_shape`` (with ``call.use_input_stats`` False: the given ``stats = (mean, var)`` as given, and their
    rstd of shape ``p.stat_shape``). ``running``: buffers that take the input's own statistics, or None."""
    p, act = call.plan, _activation(call)
    if call.use_input_stats != (stats is None):
        need = "stats=None" if call.use_input_stats else "stats=(mean, var)"
        raise ValueError(f"use_input_stats={call.use_input_stats} needs {need}")
    # the statistics launch folds per-channel statistics (K = 1: batch and instance norm, the norms with running
    # buffers) into the running buffers itself; any other plan given buffers takes the torch ops' update after it
    fused = running if (p.K == 1 and not _rows(p)) else None
    if _rows(p):
        given = None if call.use_input_stats else (_stat32(stats[0], p), _stat32(stats[1], p))
        y, mean, rstd, var = launch.layer_fwd(x, w, b, p.N, p.K, call.eps, act, given)
    elif call.use_input_stats:
        y, mean, rstd, var = launch.norm_fwd(x, w, b, p.G, p.K, p.pool_batch, call.eps, act, fused)
    else:  # the given statistics as they are (flat views, any float dtype): no copy, one launch
        y, rstd = launch.norm_apply(x, w, b, stats[0].reshape(-1), stats[1].reshape(-1), p.G, p.K, p.pool_batch,
                                    call.eps, act)  # fmt: skip
    if not call.use_input_stats:
        return y, stats[0], rstd.reshape(p.stat_shape), stats[1]
    mean, var = mean.reshape(p.stat_shape), var.reshape(p.stat_shape)
    if running is not None and fused is None:
        update_running_stats(running, mean, var, p.m)
    return y, mean, rstd.reshape(p.stat_shape), var


def backward(dy, x, w, b, mean, rstd, call: Call, need_dx: bool = True):
    """Gradients of :func:`forward`: ``(dx, dw, db)``; dx None unless ``need_dx``, dw and db None when w and b are
    None (flat, in their dtypes). Same contract as :func:`normlab.torch_ops.backward`: ``mean`` and ``rstd`` of
    shape ``p.stat_shape``, or ``(C,)`` given ones (constants when ``call.use_input_stats`` is False)."""
    p, act = call.plan, _activation(call)
    mean, rstd = _stat32(mean, p), _stat32(rstd, p)
    if _rows(p):
        dx, dw, db = launch.layer_bwd(dy, x, w, b, mean, rstd, p.N, p.K, act, call.use_input_stats, need_dx)
    else:
        dx, dw, db = launch.norm_bwd(dy, x, w, b, mean, rstd, p.G, p.K, p.pool_batch, act, call.use_input_stats,
                                     need_dx)  # fmt: skip
    return dx, (None if w is None else dw), (None if b is None else db)
