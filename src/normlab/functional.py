"""The functional norms: torch.nn.functional's signatures, a hand-derived backward, an optional fused activation.

Each public function builds a :class:`~normlab.spec.Plan` (the only place the kinds differ), validates its
arguments, and runs one :class:`torch.autograd.Function` whose backward is the formula derived in
:mod:`normlab.reference`; there is no autograd through the math. The forward saves ``(x, mean, rstd)`` and the
backward recomputes ``xhat``. Which implementation runs (torch ops or Triton kernels) is decided in
:mod:`normlab.backend`.

Double backward (``create_graph=True``) works on the torch backend by autograd through the hand-derived backward's
own tensor operations; the Triton backend supports first derivatives only.

Every function takes ``activation`` (None, ``"relu"``, ``"leaky_relu"``, ``"sigmoid"``, ``"tanh"``, ``"silu"``,
``"gelu"``) and ``placement``: ``"before"`` applies it to the norm's output (norm → activation, as the paper
places BN before the non-linearity), ``"after"`` to its input (activation → norm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normlab import activations, backend, torch_ops
from normlab.spec import Plan, plan


class _Norm(torch.autograd.Function):
    """One norm under plan ``p``: ``y = f(norm(x))`` or ``norm(f(x))``; also returns the statistics used."""

    @staticmethod
    def forward(ctx, x, w, b, stat_mean, stat_var, p: Plan, eps: float, activation, placement):
        ops = backend.select(x, p)
        stats = None if stat_mean is None else (stat_mean, stat_var)
        y, mean, var = ops.forward(x, w, b, p, eps, activation, placement, stats)
        rstd = (var + eps).rsqrt()
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.ops, ctx.p, ctx.eps, ctx.activation, ctx.placement = ops, p, eps, activation, placement
        ctx.batch_stats = stats is None
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, w, b, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the torch forward's own ops, so that the graph also carries how
            # mean and rstd depend on x (the hand-derived backward treats them as saved constants).
            dx, dw, db = _autograd_backward(ctx, dy, x, w, b, mean, rstd)
        else:
            dx, dw, db = ctx.ops.backward(
                dy, x, w, b, mean, rstd, ctx.p, ctx.activation, ctx.placement, ctx.batch_stats
            )
        dw = dw.reshape(w.shape) if need[1] else None  # backends return flat (G*K,); layer norm's w is (*D)
        db = db.reshape(b.shape) if need[2] else None
        return (dx if need[0] else None, dw, db) + (None,) * 6


def _autograd_backward(ctx, dy, x, w, b, mean, rstd):
    eps = ctx.eps
    stats = None if ctx.batch_stats else (mean, rstd.pow(-2) - eps)
    y, _, _ = torch_ops.forward(x, w, b, ctx.p, eps, ctx.activation, ctx.placement, stats)
    wrt = [t for t, need in zip((x, w, b), ctx.needs_input_grad) if need and t is not None]
    grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if (need and t is not None) else None for t, need in zip((x, w, b), ctx.needs_input_grad))


def _check_input(input, eps: float, activation, placement) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")
    if not eps > 0:  # also rejects NaN
        raise ValueError(f"eps must be > 0, got {eps}")
    activations.check(activation, placement)


def _check_vector(t, name: str, shape: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({what}), got shape {tuple(t.shape)}")


def _norm(x, w, b, p: Plan, eps, activation, placement, stats=None):
    mean, var = stats if stats is not None else (None, None)
    return _Norm.apply(x, w, b, mean, var, p, float(eps), activation, placement)


@torch.no_grad()
def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    m: int,
    momentum: float | None,
    num_batches_tracked: torch.Tensor | None = None,
    num_skipped: torch.Tensor | None = None,
) -> None:
    """Fold one batch's statistics into running buffers, in place, unless they are not finite.

    ``running = (1 - factor) · running + factor · batch`` with ``factor = momentum``, or ``1 / num_batches_tracked``
    (a cumulative average) when ``momentum`` is None. ``running_var`` receives the unbiased batch variance
    ``var · m / (m - 1)``. A batch whose mean or variance is not finite leaves every buffer untouched (torch would
    poison them with NaN) and adds one to ``num_skipped``; the choice is made on the device, without a host sync.

    Args:
        running_mean, running_var: ``(C,)`` buffers, updated in place.
        mean, var: the batch's mean and biased variance, ``C`` entries each.
        m: values per statistic in the batch.
        momentum: the moving-average factor, or None for the cumulative average.
        num_batches_tracked: scalar long buffer, incremented for every batch folded in.
        num_skipped: scalar long buffer counting skipped batches.
    """
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    mean = mean.reshape(-1).to(running_mean.dtype)
    var = (var.reshape(-1) * (m / max(m - 1, 1))).to(running_var.dtype)
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite.to(num_batches_tracked.dtype))
    if num_skipped is not None:
        num_skipped.add_((~finite).to(num_skipped.dtype))
    if momentum is None:
        factor = 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    else:
        factor = torch.tensor(momentum, dtype=running_mean.dtype, device=running_mean.device)
    for running, batch in ((running_mean, mean), (running_var, var)):
        running.copy_(torch.where(finite, factor * batch + (1 - factor) * running, running))


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
    *,
    num_batches_tracked: torch.Tensor | None = None,
    num_skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch norm of ``input`` ``(N, C, *S)``, as :func:`torch.nn.functional.batch_norm`, plus a fused activation.

    In training, statistics are the batch's own (per channel over N and S) and, when ``running_mean`` and
    ``running_var`` are given, are folded into them (see :func:`update_running_stats`); in eval, the running
    statistics normalize. Output: same shape, dtype and memory format as ``input``.

    Extras beyond torch (keyword-only, used by :mod:`normlab.nn`): ``num_batches_tracked`` enables
    ``momentum=None`` (cumulative average) and is incremented per folded batch; ``num_skipped`` counts batches
    whose non-finite statistics were kept out of the running buffers.
    """
    _check_input(input, eps, activation, placement)
    p = plan("batch", input.shape)
    c = p.G
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_vector(t, name, (c,), f"one per channel of the input of shape {tuple(input.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if training:
        if p.m == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        y, mean, var = _norm(input, weight, bias, p, eps, activation, placement)
        if running_mean is not None and p.numel > 0:
            update_running_stats(
                running_mean, running_var, mean, var, p.m, momentum, num_batches_tracked, num_skipped
            )
        return y
    if running_mean is None:
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and running_var")
    y, _, _ = _norm(input, weight, bias, p, eps, activation, placement, (running_mean, running_var))
    return y


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
) -> torch.Tensor:
    """Instance norm of ``input`` ``(N, C, *S)``, as :func:`torch.nn.functional.instance_norm`.

    Statistics per sample and channel over S. With ``use_input_stats`` and running buffers, the buffers receive the
    batch average of the per-instance mean and unbiased variance; without it, the buffers normalize.
    """
    _check_input(input, eps, activation, placement)
    p = plan("instance", input.shape)
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_vector(t, name, (p.G,), f"one per channel of the input of shape {tuple(input.shape)}")
    if use_input_stats:
        if p.R == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
        y, mean, var = _norm(input, weight, bias, p, eps, activation, placement)
        if running_mean is not None and p.numel > 0:
            update_running_stats(running_mean, running_var, mean.mean(0), var.mean(0), p.m, momentum)
        return y
    if running_mean is None or running_var is None:
        raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
    stats = (running_mean.expand(p.N, p.G), running_var.expand(p.N, p.G))
    y, _, _ = _norm(input, weight, bias, p, eps, activation, placement, stats)
    return y


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
) -> torch.Tensor:
    """Group norm of ``input`` ``(N, C, *S)``, as :func:`torch.nn.functional.group_norm`.

    Statistics per sample over each group of ``C / num_groups`` channels and S; weight and bias per channel.
    """
    _check_input(input, eps, activation, placement)
    p = plan("group", input.shape, groups=num_groups)
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vector(t, name, (p.G * p.K,), f"one per channel of the input of shape {tuple(input.shape)}")
    return _norm(input, weight, bias, p, eps, activation, placement)[0]


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
) -> torch.Tensor:
    """Layer norm of ``input`` ``(*B, *D)`` over its trailing dims ``D = normalized_shape``, as torch's.

    Weight and bias have shape ``normalized_shape`` (one value per normalized element).
    """
    _check_input(input, eps, activation, placement)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    k = len(shape)
    if k == 0 or tuple(input.shape[input.dim() - k :]) != shape or input.dim() < k:
        raise ValueError(
            f"layer_norm: input must end in normalized_shape {shape}, got input of shape {tuple(input.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vector(t, name, shape, "normalized_shape")
    p = plan("layer", input.shape, normalized_ndim=k)
    return _norm(input, weight, bias, p, eps, activation, placement)[0]
