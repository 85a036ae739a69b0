"""ATen's own norm kernels on shifted input: the CPU path for inputs small enough that per-call Python dominates.

On a small input (BatchNorm1d on a (60, 100) batch) one training step of a Python ``autograd.Function`` around
compiled loops costs about twice torch.nn's, whatever the loops do: the Function, the engine's call back into Python
and the loops' dispatch cost more than the arithmetic. Here the norm runs as ATen's ``batch_norm``, ``layer_norm``,
``group_norm`` and ``instance_norm``, whose forward and backward are C++ autograd nodes, after one subtraction that
keeps normlab's precision. ATen's CPU kernels lose digits when the mean is large against the spread (mean 1e4, std
1e-2 in float32: torch.nn's BatchNorm1d output is off by a fifth of a standard deviation); normalizing is
shift-invariant, so each statistic's values are first shifted by one of its own values::

    a = x, or f(x) when the activation is "after"
    shift = a at the first position of each statistic       (detached: a constant of the graph)
    z = norm(a - shift)                                     ATen's kernel; equal to norm(a) in exact arithmetic
    y = f(z) when "before", else z

and ``a - shift`` is centred to within a few standard deviations, where ATen's float32 sums are exact enough. Given
statistics (eval) shift by the given mean instead: ``batch_norm(a - mean, w, b, 0, var)``, as ATen's eval form
``a * scale + (b - mean * scale)`` would cancel the large terms.

Running statistics: ATen folds the shifted batch mean into a shifted copy of ``running.mean`` (``running.mean -
shift``; the shift is added back) and the variance, which is shift-invariant, into a copy of ``running.var``; the
copies replace the buffers only when the new variance is finite (a batch holding inf or NaN, or whose squares
overflow, gives a non-finite variance), so a bad batch leaves the buffers untouched and counts in ``num_skipped``.
That check reads one number on the host, which costs nothing on the CPU, the only device this path runs on.

Double backward comes with ATen's formulas. What runs here is chosen by :mod:`normlab.backend`.
"""

from __future__ import annotations

import functools
import math

import torch

from normlab import activations
from normlab.spec import Call, Plan, Running
from normlab.torch_ops import is_channels_last

# Where this path is the faster one under NORMLAB_BACKEND=auto, read off benchmarks/crossover.py's table (2-core dev
# machine, one thread, against the numba loops; see benchmarks/RESULTS.md). A training step (a gradient is wanted)
# and a forward alone (eval, inference) differ: the shift is one extra pass, which a backward amortizes.
# - small inputs (up to SMALL values), any kind: per-call Python dominates the loops' path (ATen's 0.5-0.9x);
# - batch norm with channels innermost in memory ((N, C), channels_last), the loops' row-of-channels family: the
#   loops beyond SMALL (ATen's 0.9-1.0x in training, 1.0-1.9x in eval);
# - layer norm: ATen's in training up to LAYER_MAX values (0.6-0.75x; 1.2x at 4M), the loops' in a forward alone
#   (ATen's 1.2-1.8x from 256K values);
# - batch, instance and group norm of contiguous (N, C, *S): ATen's while a plane (the loops' row) holds at most
#   ROW_MAX values (0.3-0.95x in training), in a forward alone only up to EVAL_MAX values; the loops' for longer
#   rows (ATen's 1.1-1.9x at 28x28 and larger).
SMALL = 1 << 16
LAYER_MAX = 1 << 21
ROW_MAX = 256
EVAL_MAX = 1 << 18


def supports(x: torch.Tensor, call: Call, stats=None, running: Running | None = None) -> bool:
    """Whether this path normalizes ``x``: a dense float32/float64 CPU tensor with values, whose given statistics
    and running buffers (if any) are CPU tensors of its dtype. Not instance norm of a channels_last input (ATen's
    output would not stay channels_last), and running buffers only for batch norm (instance norm's would take the
    average of per-sample shifted means)."""
    if not (x.is_cpu and x.dtype in (torch.float32, torch.float64) and x.layout == torch.strided and x.numel() > 0):
        return False
    if call.plan.kind == "instance" and is_channels_last(x):
        return False
    if running is not None:
        return call.plan.kind == "batch" and running.mean.dtype == x.dtype and running.mean.is_cpu
    if stats is not None:
        return all(t.dtype == x.dtype and t.is_cpu for t in stats)
    return True


def pays(x: torch.Tensor, call: Call, grad: bool) -> bool:
    """Whether this path is the faster one for ``call`` on ``x`` (``NORMLAB_BACKEND=auto``), in a training step
    (``grad``: a gradient is wanted) or a forward alone, as measured above."""
    p = call.plan
    if p.numel <= SMALL:
        return True
    if p.kind == "layer":
        return grad and p.numel <= LAYER_MAX
    if p.kind == "batch" and (p.R == 1 or is_channels_last(x)):
        return False
    return p.R <= ROW_MAX and (grad or p.numel <= EVAL_MAX)


@functools.lru_cache(maxsize=256)
def _first(kind: str, ndim: int, normalized_ndim: int, K: int) -> tuple:
    """The index of each statistic's first position in an input of ``ndim`` dims (kept dims, so it broadcasts)."""
    one = slice(0, 1)
    if kind == "layer":
        return (Ellipsis,) + (one,) * normalized_ndim
    spatial = (one,) * (ndim - 2)
    if kind == "batch":
        return (one, slice(None)) + spatial
    return (slice(None), slice(None, None, K)) + spatial                # instance (K = 1) and group: per sample


def _shift(a: torch.Tensor, p: Plan) -> torch.Tensor:
    """One value per statistic of ``a`` (detached), broadcastable to ``a``: (1, C, 1..), (N, C, 1..) or (*B, 1..)."""
    s = a.detach()[_first(p.kind, a.dim(), p.normalized_ndim, p.K)]
    if p.kind == "group" and p.K > 1:
        s = s.repeat_interleave(p.K, dim=1)                               # (N, G, 1..) -> (N, C, 1..)
    return s


def norm(x: torch.Tensor, w, b, call: Call, stats=None, running: Running | None = None) -> torch.Tensor:
    """The norm of ``x`` (shape ``call.plan.shape``) with the input's own statistics (folded into ``running`` when
    given) or with given ``stats = (mean, var)`` ``(C,)``; differentiable by autograd through ATen's nodes."""
    p = call.plan
    f = activations.get(call.activation, call.negative_slope)
    a = f.fn(x) if f is not None and call.placement == "after" else x
    if not call.use_input_stats:                                          # given (running) statistics
        mean, var = stats
        if a.dim() > 2:
            mean = mean.reshape((-1,) + (1,) * (a.dim() - 2))             # (C, 1..) broadcasts over (N, C, *S)
        z = torch.batch_norm(a - mean, w, b, _zeros(var), var, False, 0.0, call.eps, False)
    elif p.kind == "batch":
        z = _batch(a, _shift(a, p), w, b, call, running)
    elif p.kind == "layer":
        z = torch.layer_norm(a - _shift(a, p), p.shape[len(p.shape) - p.normalized_ndim:], w, b, call.eps)
    elif p.kind == "group":
        z = torch.group_norm(a - _shift(a, p), p.G, w, b, call.eps)
    else:
        z = torch.instance_norm(a - _shift(a, p), w, b, None, None, True, 0.0, call.eps, False)
    return f.fn(z) if f is not None and call.placement == "before" else z


_ZEROS: dict = {}


def _zeros(like: torch.Tensor) -> torch.Tensor:
    """Zeros like ``like`` (a CPU ``(C,)`` statistic): one tensor per size and dtype, shared between calls, which
    only read it (the mean of the already-shifted input in eval)."""
    key = (like.shape[0], like.dtype)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(key[0], dtype=key[1])
    return _ZEROS[key]


def _batch(a: torch.Tensor, shift: torch.Tensor, w, b, call: Call, running: Running | None) -> torch.Tensor:
    """Batch norm of ``a - shift`` with the batch's statistics (``shift`` ``(1, C, 1..)``), and the guarded running
    update."""
    if running is None:
        return torch.batch_norm(a - shift, w, b, None, None, True, 0.0, call.eps, False)
    nbt = running.num_batches_tracked
    factor = running.momentum
    if factor is None:  # the cumulative average (normlab.functional.batch_norm checks that nbt is given)
        factor = 1.0 / (int(nbt) + 1)
    s = shift.reshape(-1)                                                 # (C,)
    mean_s, var = running.mean - s, running.var.clone()                   # ATen updates these copies
    z = torch.batch_norm(a - shift, w, b, mean_s, var, True, factor, call.eps, False)
    # one number read on the host (free on the CPU); summed in float64 so that large finite variances cannot
    # overflow the check. Nothing here requires grad.
    if math.isfinite(var.sum(dtype=torch.float64).item()):
        torch.add(mean_s, s, out=running.mean)
        running.var.copy_(var)
        if nbt is not None:
            nbt.add_(1)
    elif running.num_skipped is not None:
        running.num_skipped.add_(1)
    return z
