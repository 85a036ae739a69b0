"""The functional norms: torch.nn.functional's signatures, a hand-derived backward, an optional fused activation.

Each public function builds a :class:`~normlab.spec.Plan` (the only place the kinds differ), validates its
arguments, and runs one custom op, ``torch.ops.normlab.norm_forward`` (registered with :mod:`torch.library`, so
``torch.compile(fullgraph=True)`` sees a single op), whose autograd formula is ``torch.ops.normlab.norm_backward``:
the backward derived in :mod:`normlab.reference`, with no autograd through the math. The forward saves
``(x, mean, rstd)`` and the backward recomputes ``xhat``. Which implementation runs inside the ops (torch or Triton)
is decided in :mod:`normlab.backend`.

Double backward (``create_graph=True``) falls back to autograd through the torch path's forward (so it also
differentiates how mean and rstd depend on x); first derivatives always take the hand-derived backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normlab import backend, torch_ops
from normlab.spec import Plan, check_activation, plan

# The norm is two functions, forward and hand-derived backward. Under torch.compile they are two custom ops, so the
# compiler sees one opaque op per direction (no graph break, no tracing into the backend choice or the Triton
# launch); in eager mode the same functions run through a plain autograd.Function, which costs a fraction of the
# custom-op dispatch on small inputs. A plan travels as (kind, groups, normalized_ndim): 0 = not used by the kind.


def _plan_of(x: torch.Tensor, kind: str, groups: int, normalized_ndim: int) -> Plan:
    return plan(kind, x.shape, groups=groups or None, normalized_ndim=normalized_ndim or None)


def _norm_forward(
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    stat_mean: torch.Tensor | None,
    stat_var: torch.Tensor | None,
    kind: str,
    groups: int,
    normalized_ndim: int,
    eps: float,
    activation: str | None,
    placement: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, var)``: the norm of x, with its own statistics or the given ``(stat_mean, stat_var)``."""
    p = _plan_of(x, kind, groups, normalized_ndim)
    stats = None if stat_mean is None else (stat_mean, stat_var)
    y, mean, var = backend.select(x, p).forward(x, w, b, p, eps, activation, placement, stats)
    if stats is not None:  # an op's outputs may not alias its inputs
        mean, var = mean.clone(), var.clone()
    return y, mean, var


_norm_forward_op = torch.library.custom_op("normlab::norm_forward", _norm_forward, mutates_args=())


@_norm_forward_op.register_fake
def _(x, w, b, stat_mean, stat_var, kind, groups, normalized_ndim, eps, activation, placement):
    p = _plan_of(x, kind, groups, normalized_ndim)
    stat = x.new_empty(p.stat_shape, dtype=torch_ops.compute_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch_ops.output_format(x, p)), stat, torch.empty_like(stat)


def _norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    kind: str,
    groups: int,
    normalized_ndim: int,
    activation: str | None,
    placement: str,
    batch_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)``, the hand-derived gradients; dw/db are empty when w/b are None."""
    p = _plan_of(x, kind, groups, normalized_ndim)
    dx, dw, db = backend.select(x, p).backward(dy, x, w, b, mean, rstd, p, activation, placement, batch_stats)
    return dx, (x.new_empty(0) if dw is None else dw), (x.new_empty(0) if db is None else db)


_norm_backward_op = torch.library.custom_op("normlab::norm_backward", _norm_backward, mutates_args=())


@_norm_backward_op.register_fake
def _(dy, x, w, b, mean, rstd, kind, groups, normalized_ndim, activation, placement, batch_stats):
    p = _plan_of(x, kind, groups, normalized_ndim)
    dx = torch.empty_like(x, memory_format=torch_ops.output_format(x, p))
    dw = x.new_empty(0) if w is None else w.new_empty(p.affine_size)
    db = x.new_empty(0) if b is None else b.new_empty(p.affine_size)
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    x, w, b, stat_mean, _, kind, groups, normalized_ndim, eps, activation, placement = inputs
    _, mean, var = output
    ctx.save_for_backward(x, w, b, mean, (var + eps).rsqrt())
    ctx.args = (kind, groups, normalized_ndim, activation, placement, stat_mean is None)
    ctx.eps = eps


def _backward(ctx, dy, _dmean, _dvar):
    x, w, b, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        # create_graph=True: differentiate the torch forward's own ops, so that the graph also carries how
        # mean and rstd depend on x (the hand-derived backward treats them as saved constants).
        dx, dw, db = _autograd_backward(ctx, dy, x, w, b, mean, rstd)
    else:
        run = _norm_backward_op if torch.compiler.is_compiling() else _norm_backward
        dx, dw, db = run(dy, x, w, b, mean, rstd, *ctx.args)
    dw = dw.reshape(w.shape) if need[1] else None  # backends return flat (G*K,); layer norm's w is (*D)
    db = db.reshape(b.shape) if need[2] else None
    return (dx if need[0] else None, dw, db) + (None,) * 8


_norm_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _NormFunction(torch.autograd.Function):
    """The eager-mode twin of ``normlab::norm_forward``: the same forward, context and backward functions.

    (The ``forward(ctx, ...)`` form: with a separate ``setup_context``, every call binds a signature with inspect.)
    """

    @staticmethod
    def forward(ctx, *inputs):
        output = _norm_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def _autograd_backward(ctx, dy, x, w, b, mean, rstd):
    kind, groups, normalized_ndim, activation, placement, batch_stats = ctx.args
    p = _plan_of(x, kind, groups, normalized_ndim)
    # Given statistics are constants: detached, or autograd would walk back into this very op.
    stats = None if batch_stats else (mean.detach(), rstd.detach().pow(-2) - ctx.eps)
    y = torch_ops.forward_autograd(x, w, b, p, ctx.eps, activation, placement, stats)
    inputs = (x, w, b)
    wrt = [t for t, need in zip(inputs, ctx.needs_input_grad) if need and t is not None]
    grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if (need and t is not None) else None for t, need in zip(inputs, ctx.needs_input_grad))


def _check_input(input, eps: float, activation, placement) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")
    if not eps > 0:  # also rejects NaN
        raise ValueError(f"eps must be > 0, got {eps}")
    check_activation(activation, placement)


def _check_shapes(shape: tuple[int, ...], what: str, **tensors) -> None:
    """Each given tensor must have ``shape``; the error names the argument, the expected and the actual shape."""
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} ({what}), got shape {tuple(t.shape)}")


def _per_channel(input: torch.Tensor, p: Plan, **tensors) -> None:
    _check_shapes((p.G * p.K,), f"one per channel of the input of shape {tuple(input.shape)}", **tensors)


def _norm(x, w, b, p: Plan, eps, activation, placement, stats=None):
    mean, var = stats if stats is not None else (None, None)
    groups = p.G if p.kind == "group" else 0
    run = _norm_forward_op if torch.compiler.is_compiling() else _NormFunction.apply
    return run(x, w, b, mean, var, p.kind, groups, p.normalized_ndim, float(eps), activation, placement)


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
    batch = torch.stack((mean.reshape(-1), var.reshape(-1) * (m / max(m - 1, 1)))).to(running_mean.dtype)  # (2, C)
    finite = batch.isfinite().all()
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite)
    if num_skipped is not None:
        num_skipped.add_(~finite)
    factor = momentum if momentum is not None else 1.0 / num_batches_tracked.clamp(min=1).to(running_mean.dtype)
    running = torch.stack((running_mean, running_var))                                            # (2, C)
    running = torch.where(finite, torch.lerp(running, batch, factor), running)
    running_mean.copy_(running[0])
    running_var.copy_(running[1])


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
    _per_channel(input, p, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var must both be given or both be None; got {missing}=None")
    if training:
        if p.m == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        y, mean, var = _norm(input, weight, bias, p, eps, activation, placement)
        if running_mean is not None and p.numel > 0:
            update_running_stats(
                running_mean, running_var, mean, var, p.m, momentum, num_batches_tracked, num_skipped
            )
        elif num_batches_tracked is not None:  # an empty batch changes no statistic but counts, as in torch
            num_batches_tracked.add_(1)
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
    _per_channel(input, p, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
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
    _per_channel(input, p, weight=weight, bias=bias)
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
    _check_shapes(shape, "normalized_shape", weight=weight, bias=bias)
    p = plan("layer", input.shape, normalized_ndim=k)
    return _norm(input, weight, bias, p, eps, activation, placement)[0]
