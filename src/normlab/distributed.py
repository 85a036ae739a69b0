"""Batch norm over the global batch of a torch.distributed process group (synchronized batch norm).

Every rank holds a shard of the global batch, of any size (an empty shard included). The forward all-gathers each
rank's per-channel ``(count, mean, M2)``, ``M2 = Σ (a - mean)²``, in one collective and merges them exactly
(:func:`merge_moments`, Chan et al.'s parallel formula), so unequal shards give exactly the statistics of the
concatenated batch; the input is then normalized with those global statistics by the backend's path for given
statistics, which also applies the fused activation. The backward all-reduces the two per-channel sums it needs in
one collective. Only ``torch.distributed``'s own collectives travel between ranks (any backend: gloo on the CPU,
NCCL on GPUs).

The layer is :class:`normlab.nn.SyncBatchNorm`; this module holds its collectives, its autograd function, the
converter and what :func:`normlab.precise_bn` needs to pool across ranks.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from normlab import activations, backend, torch_ops
from normlab import functional as F
from normlab.spec import LEAKY_SLOPE, Call, Running

_LOCAL = contextvars.ContextVar("normlab_local_batch_stats", default=False)


@contextlib.contextmanager
def local_batch_stats() -> Iterator[None]:
    """Inside this block SyncBatchNorm layers normalize with each rank's own batch (no collective), as BatchNorm.

    :func:`normlab.precise_bn` runs its passes so: each batch is then normalized as in a single process, and ranks
    may hold different numbers of batches.
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def check_process_group(process_group, who: str) -> None:
    """Raise ``TypeError`` unless ``process_group`` is None or a ``torch.distributed.ProcessGroup``."""
    if process_group is None:
        return
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(
            f"{who}: process_group must be None (the default group) or a torch.distributed.ProcessGroup "
            f"(e.g. from torch.distributed.new_group), got {type(process_group).__name__}"
        )


def sync_group(process_group=None):
    """The group to synchronize over: ``process_group`` (None: the default group) when torch.distributed is
    initialized, it has more than one rank and no :func:`local_batch_stats` block is open; else None."""
    if not (dist.is_available() and dist.is_initialized()) or _LOCAL.get():
        return None
    group = dist.group.WORLD if process_group is None else process_group
    return group if dist.get_world_size(group) > 1 else None


def _failed(who: str, what: str, group, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"{who}: {what} across the process group failed on rank {dist.get_rank()} (rank {dist.get_rank(group)} of "
        f"{dist.get_world_size(group)} in the group). Another rank has died, raised, or stopped calling the same "
        f"collectives (every rank must run the layer, an empty batch included), or the group's timeout passed: {e}"
    )


def all_gather(v: torch.Tensor, group, who: str) -> torch.Tensor:
    """Every rank's ``v`` (1-D, the same size on every rank) as ``(world_size, len(v))``: one collective.

    A failing collective (a rank that died, the group's timeout) raises ``RuntimeError`` naming ``who``, the
    collective and this rank.
    """
    out = v.new_empty(dist.get_world_size(group) * v.numel())  # flat: gloo takes no (world, n) output
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the former from torch 2.13
    try:
        gather(out, v.contiguous(), group=group)
    except RuntimeError as e:
        raise _failed(who, "all_gather of the batch statistics", group, e) from e
    return out.view(-1, v.numel())


def _all_reduce(t: torch.Tensor, group, who: str) -> torch.Tensor:
    try:
        dist.all_reduce(t, group=group)
    except RuntimeError as e:
        raise _failed(who, "all_reduce of the gradient sums", group, e) from e
    return t


def merge_moments(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Pool parts given by their count, mean and sum of squared deviations into the whole's (Chan et al.).

    ``mean = Σ n_i mean_i / n`` and ``M2 = Σ M2_i + Σ n_i (mean_i - mean)²`` over the parts ``i``, ``n = Σ n_i``:
    exact, whatever the parts' sizes; a part with ``n_i = 0`` counts for nothing (its mean and M2 must be finite,
    e.g. 0); no parts with values gives ``n = 0``, mean 0, M2 0.

    Args:
        n: ``(P,)`` counts; mean, m2: ``(P, C)``.

    Returns:
        ``(n, mean, m2)``: ``()``, ``(C,)``, ``(C,)``.
    """
    total = n.sum()
    mu = (n[:, None] * mean).sum(0) / total.clamp(min=1)
    return total, mu, m2.sum(0) + (n[:, None] * (mean - mu).square()).sum(0)


def _global_stats(x: torch.Tensor, call: Call, group, who: str):
    """``(n, mean, var)`` of the global batch: the count as an int, the mean and biased variance ``(C,)`` in the
    statistics dtype. One all_gather of ``[count, mean (C), M2 (C)]`` per rank, in float64 so that counts stay
    exact past 2^24."""
    p = call.plan
    with torch.no_grad():
        if p.numel:
            a = torch_ops._normalized(x, call)                                 # (N, C, 1, R), f(x) when "after"
            var, mean = torch.var_mean(a, dim=p.stat_axes, correction=0)      # (1, C) each
            local = torch.cat((mean.new_full((1,), p.m), mean.reshape(-1), var.reshape(-1) * p.m))
        else:  # an empty shard still joins the collective, with count 0
            local = x.new_zeros(2 * p.G + 1, dtype=torch.float64)
        parts = all_gather(local.to(torch.float64), group, who)               # (W, 2C + 1)
        n, mean, m2 = merge_moments(parts[:, 0], parts[:, 1 : p.G + 1], parts[:, p.G + 1 :])
        n = int(n)  # the one host sync: the running update and the check below need the global count
        cdt = torch_ops.compute_dtype(x.dtype)
        return n, mean.to(cdt), (m2 / max(n, 1)).to(cdt)


class _SyncNorm(torch.autograd.Function):
    r"""Autograd for batch norm with global statistics: ``forward(x, w, b, call, mean, var, n, impl, group, who)``.

    The forward normalizes with the given global ``mean`` and biased ``var`` (``call.use_input_stats`` False) and
    saves ``(x, w, b, mean, rstd)``. In the backward, ``n`` is the global count, sums run over every rank's values
    of a channel, and ``a = x`` (``f(x)`` for placement "after")::

        xhat = (a - mean) * rstd
        dz   = dy * f'(z) (placement "before") or dy          the pre-activation gradient
        db   = Σ_local dz,  dw = Σ_local dz * xhat             this rank's share; DDP all-reduces dw and db
        da   = rstd * w * (dz - Σ dz / n - xhat * Σ (dz * xhat) / n)
        dx   = da * f'(x) (placement "after") or da

    The backend's backward for given statistics returns ``rstd * w * dz`` (times ``f'(x)``) and the local sums as
    its ``db``, ``dw``; the sums are stacked and all-reduced in one call, and the two global terms are subtracted
    here (for float16/bfloat16 inputs the backend's part is rounded to the input dtype first).
    """

    @staticmethod
    def forward(ctx, x, w, b, call: Call, mean, var, n: int, impl, group, who: str):
        y, mean, rstd, _ = impl.forward(x, w, b, call, (mean, var))
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.call, ctx.n, ctx.impl, ctx.group, ctx.who = call, n, impl, group, who
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        call, p = ctx.call, ctx.call.plan
        need = ctx.needs_input_grad
        cdt = torch_ops.compute_dtype(x.dtype)
        # ones and zeros stand in for a missing w or b: the backend then returns both sums, in float32 or float64
        w_ = x.new_ones(p.G, dtype=cdt) if w is None else w.detach().to(cdt)
        b_ = x.new_zeros(p.G, dtype=cdt) if b is None else b.detach().to(cdt)
        dx, dw, db = ctx.impl.backward(dy, x, w_, b_, mean, rstd, call, need[0])
        sums = _all_reduce(torch.stack((db, dw)), ctx.group, ctx.who)        # (2, C): Σ dz, Σ dz * xhat
        if need[0]:
            f = activations.get(call.activation, call.negative_slope)
            xhat = (torch_ops._normalized(x, call) - torch_ops._stat4(mean, p, cdt)) * torch_ops._stat4(rstd, p, cdt)
            k = torch_ops._stat4(rstd.reshape(-1) * w_ / max(ctx.n, 1), p, cdt)  # (1, C, 1, 1)
            # the global terms of da: rstd * w * (Σ dz + xhat * Σ dz * xhat) / n
            da_global = k * (torch_ops._stat4(sums[0], p, cdt) + xhat * torch_ops._stat4(sums[1], p, cdt))
            if f is not None and call.placement == "after":
                da_global = da_global * f.grad(torch_ops.view4(x, p).to(cdt))
            dx = torch_ops.unview((torch_ops.view4(dx, p).to(cdt) - da_global).to(x.dtype), x, p)
        dw = dw.to(w.dtype) if need[1] else None
        db = db.to(b.dtype) if need[2] else None
        return (dx if need[0] else None, dw, db) + (None,) * 7


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
    *,
    negative_slope: float = LEAKY_SLOPE,
    num_batches_tracked: torch.Tensor | None = None,
    num_skipped: torch.Tensor | None = None,
    group=None,
    who: str = "sync_batch_norm",
) -> torch.Tensor:
    """Training-mode batch norm of ``input`` ``(N, C, *S)`` with the statistics of the whole group's batch.

    The arguments are :func:`normlab.functional.batch_norm`'s (``training`` must be True), plus ``group`` (the
    process group; None: the default one) and ``who`` (names the caller in errors). Every rank of the group must
    call it, an empty ``input`` (N = 0) included. The running buffers, when given, take the global mean and the
    global unbiased variance ``M2 / (n - 1)``; a global batch with non-finite statistics (a non-finite value on any
    rank) leaves them untouched on every rank and counts in ``num_skipped`` on every rank. Output: as ``input``.
    """
    if not training:
        raise ValueError(f"{who}: synchronized batch norm normalizes with batch statistics only (training=True)")
    # the Call of the normalization itself: global statistics are given to the backend
    call = F._running_stats_call("batch", input, False, momentum, eps, activation, placement, negative_slope,
                                 running_mean, running_var, weight, bias)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{who}: running_mean and running_var must both be given or both be None")
    if momentum is None and num_batches_tracked is None and running_mean is not None:
        raise ValueError(f"{who}: momentum=None (cumulative average) needs num_batches_tracked")
    n, mean, var = _global_stats(input, call, group, who)
    if n == 1:
        raise ValueError(f"{who}: expected more than 1 value per channel in the global batch when training, got 1")
    if running_mean is not None and n > 0:
        running = Running(running_mean, running_var, momentum, num_batches_tracked, num_skipped)
        torch_ops.update_running_stats(running, mean[None], var[None], n)
    elif running_mean is not None and num_batches_tracked is not None:  # an empty global batch counts, as in torch
        num_batches_tracked.add_(1)
    # an empty shard has nothing to compute; a forced backend (NORMLAB_BACKEND) may refuse it
    impl = torch_ops if input.numel() == 0 else backend.select(input, call.plan)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
        return _SyncNorm.apply(input, weight, bias, call, mean, var, n, impl, group, who)
    return impl.forward(input, weight, bias, call, (mean, var))[0]


def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """``module`` with every batch-norm layer (torch.nn's or normlab's ``_BatchNorm`` subclasses) replaced by a
    ``cls`` (normlab's SyncBatchNorm) on ``process_group``; a batch-norm ``module`` itself gives a new layer.

    The new layer shares the old one's parameters and buffers (the same tensors: an optimizer built before keeps
    working) and takes its training flag, fused activation, placement and negative slope.
    """
    check_process_group(process_group, f"{cls.__name__}.convert_sync_batchnorm")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"{cls.__name__}.convert_sync_batchnorm expects a torch.nn.Module, got {type(module).__name__}"
        )
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and _normalizes_otherwise(module):
        warnings.warn(f"{cls.__name__}.convert_sync_batchnorm: {type(module).__name__} left as it is (batch renorm "
                      "and ghost batch norm have no synchronized form)", UserWarning, stacklevel=3)
    elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        ref = module.running_mean if module.running_mean is not None else module.weight
        out = cls(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            process_group, device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
            bias=module.bias is not None, activation=getattr(module, "activation", None),
            placement=getattr(module, "placement", "before"),
            negative_slope=getattr(module, "negative_slope", LEAKY_SLOPE),
        )
        for name, p in module.named_parameters(recurse=False):
            setattr(out, name, p)
        for name, buf in module.named_buffers(recurse=False):
            setattr(out, name, buf)
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(cls, child, process_group))
    return out


def _normalizes_otherwise(m: torch.nn.Module) -> bool:
    """Whether a batch-norm layer is batch renorm (its ``rmax`` buffer) or ghost batch norm (``virtual_batch_size``),
    which a SyncBatchNorm would silently turn into plain batch norm."""
    return "rmax" in m._buffers or getattr(m, "virtual_batch_size", None) is not None


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """torch's DistributedDataParallel (same arguments, same behaviour) that also takes CPU modules holding normlab's
    SyncBatchNorm.

    torch's refuses any ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU
    modules"), subclasses included, because torch's own layer runs on GPUs only; normlab's runs on every device.
    The refusal is kept for torch's own layer. On GPUs torch's class works as well.
    """

    def _passing_sync_batchnorm_handle(self, module):
        from normlab.nn import SyncBatchNorm  # normlab.nn imports this module

        if any(isinstance(m, torch.nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm) for m in module.modules()):
            super()._passing_sync_batchnorm_handle(module)
