"""Population statistics for batch norm: the paper's "mean and variance over the entire training set"."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from normlab import activations
from normlab.distributed import all_gather, check_process_group, local_batch_stats, merge_moments
from normlab.spec import LEAKY_SLOPE, plan
from normlab.torch_ops import view4


class _Pooled:
    """Running count, mean and sum of squared deviations per channel, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # (C,) float64
        self.m2: torch.Tensor | None = None  # (C,) float64

    def add(self, x: torch.Tensor, where: str) -> None:
        p = plan("batch", x.shape)
        if p.numel == 0:
            return
        var, mean = torch.var_mean(view4(x, p).to(torch.float64), dim=p.stat_axes, correction=0)
        mean, m2, n_b = mean.reshape(-1), var.reshape(-1) * p.m, p.m
        if not (torch.isfinite(mean).all() and torch.isfinite(m2).all()):
            raise ValueError(f"precise_bn: {where} has non-finite statistics; every buffer is left as it was")
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean, m2
            return
        n = torch.tensor([self.n, n_b], dtype=torch.float64, device=mean.device)
        _, self.mean, self.m2 = merge_moments(n, torch.stack((self.mean, mean)), torch.stack((self.m2, m2)))
        self.n += n_b


def _pool_across(pooled: dict, failed: bool, group) -> list[int]:
    """Pool every layer's moments over the ranks of ``group`` in one all_gather, in place; returns the ranks whose
    own pass failed (and then pools nothing)."""
    layers = list(pooled)
    device = layers[0].running_mean.device
    parts = [torch.tensor([float(failed)], dtype=torch.float64, device=device)]
    for m in layers:
        zeros = torch.zeros(m.running_mean.numel(), dtype=torch.float64, device=device)
        p = pooled[m]
        parts += [torch.tensor([float(p.n)], dtype=torch.float64, device=device),
                  zeros if p.mean is None else p.mean, zeros if p.m2 is None else p.m2]
    rows = all_gather(torch.cat(parts), group, "precise_bn")          # (W, 1 + Σ (1 + 2C))
    bad = rows[:, 0].nonzero().flatten().tolist()
    if bad:
        return bad
    start = 1
    for m in layers:
        c = m.running_mean.numel()
        n, mean, m2 = rows[:, start], rows[:, start + 1 : start + 1 + c], rows[:, start + 1 + c : start + 1 + 2 * c]
        n, pooled[m].mean, pooled[m].m2 = merge_moments(n, mean, m2)
        pooled[m].n = int(n)
        start += 1 + 2 * c
    return []


def _input_of(batch: Any, key: Any, input_fn: Callable[[Any], Any] | None, index: int) -> Any:
    """The model's input in one batch: ``input_fn(batch)``; else a tensor as is, a tuple/list's first item, or a
    dict's ``key`` item."""
    if input_fn is not None:
        return input_fn(batch)
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        if key is None:
            raise TypeError(
                f"precise_bn: batch {index} is a dict (keys {list(batch)}); say which item is the input with "
                "key=... or input_fn=..."
            )
        return batch[key]
    raise TypeError(
        f"precise_bn: batch {index} is a {type(batch).__name__}; expected a tensor, a tuple/list whose first item is "
        "the input, or a dict with key=...; or pass input_fn=... to take the input from any batch"
    )


@torch.no_grad()
def precise_bn(
    model: torch.nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    process_group=None,
    *,
    key: Any = None,
    input_fn: Callable[[Any], Any] | None = None,
) -> torch.nn.Module:
    """Set every batch-norm layer's running statistics to the exact population ones over ``batches``.

    Runs the model forward over the batches with its batch-norm layers in training mode (so each layer sees the
    inputs it sees in training) and pools, per channel, every value each layer normalizes: ``running_mean`` becomes
    the mean over all of them and ``running_var`` their unbiased variance (``Σ (x - mean)² / (n - 1)`` over all
    ``n`` values), exact for batches of unequal size. Works for normlab's and torch.nn's batch-norm layers with
    ``track_running_stats=True``; other modules keep their mode (call it in the mode you train in, or in eval to
    keep dropout out). Training flags and every other buffer (``num_batches_tracked``, ``num_skipped_updates``) are
    restored; if anything fails (a batch with non-finite statistics included), every buffer is left as it was.

    With a ``process_group`` (a ``torch.distributed.ProcessGroup``, e.g. ``torch.distributed.group.WORLD``), every
    rank of the group calls it with its own batches (any number of them, none included) and every rank receives
    the statistics pooled exactly over all ranks' batches: one all_gather of each layer's count, mean and sum of
    squared deviations per rank, merged in float64. If any rank's pass fails, every rank raises and keeps its
    buffers. SyncBatchNorm layers normalize each batch with its own statistics during the pass (no collective per
    batch), so the result equals precise_bn over all ranks' batches in one process.

    Args:
        model: the network.
        batches: an iterable of batches: input tensors, tuples/lists whose first item is the input (a DataLoader),
            or dicts whose ``key`` item is the input.
        num_batches: use at most this many batches (all when None).
        process_group: pool across the ranks of this group; None: this process's batches only.
        key: the input's key in dict batches.
        input_fn: takes the model's input from a batch of any kind (overrides the rules above); what it returns
            is passed to the model as is.

    Returns:
        ``model``, updated in place.
    """
    check_process_group(process_group, "precise_bn")
    layers = [
        m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not layers:
        return model
    names = {m: name or type(m).__name__ for name, m in model.named_modules()}
    saved = {m: (m.training, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in layers}
    pooled = {m: _Pooled() for m in layers}
    batch_index = 0

    def record(module, args):
        x = args[0]
        f = activations.get(getattr(module, "activation", None), getattr(module, "negative_slope", LEAKY_SLOPE))
        if f is not None and getattr(module, "placement", "before") == "after":
            x = f.fn(x)  # such a layer normalizes f(x), not x
        pooled[module].add(x, f"layer {names[module]!r} at batch {batch_index}")

    handles = [m.register_forward_pre_hook(record) for m in layers]
    param = next(model.parameters(), None)
    device = param.device if param is not None else None
    ok = False
    try:
        for m in layers:
            m.train()
        error = None
        try:
            with local_batch_stats():
                for batch_index, batch in enumerate(batches):  # record() reads batch_index
                    if num_batches is not None and batch_index >= num_batches:
                        break
                    x = _input_of(batch, key, input_fn, batch_index)
                    model(x.to(device) if (device is not None and isinstance(x, torch.Tensor)) else x)
        except Exception as e:
            if process_group is None:
                raise
            error = e  # the other ranks wait for this one's statistics: tell them, then raise
        if process_group is not None:
            failed = _pool_across(pooled, error is not None, process_group)
            if error is not None:
                raise error
            if failed:
                raise RuntimeError(f"precise_bn: rank(s) {failed} failed; every buffer is left as it was")
        for m in layers:
            if pooled[m].n < 2:
                raise ValueError(
                    f"precise_bn needs at least 2 values per channel in every batch-norm layer; "
                    f"layer {names[m]!r} saw {pooled[m].n}"
                )
        ok = True
    finally:
        for h in handles:
            h.remove()
        for m, (training, buffers) in saved.items():
            m.train(training)
            for k, v in buffers.items():
                getattr(m, k).copy_(v)
            if ok:
                m.running_mean.copy_(pooled[m].mean)
                m.running_var.copy_(pooled[m].m2 / (pooled[m].n - 1))
    return model
