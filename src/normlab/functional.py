"""The functional norms: torch.nn.functional's signatures, a hand-derived backward, an optional fused activation.

Each public function checks its arguments, takes the :class:`~normlab.spec.Call` of the input's shape (built
once per shape, then cached) and runs it (:mod:`normlab.backend` chooses) in one of these ways:

- float32/float64 CPU tensors, eager: the native C++ kernels (:mod:`normlab.native`: one C++ call per direction,
  the autograd node in C++), or where they cannot be built, for small inputs, ATen's own kernels on shifted input
  (:mod:`normlab.aten_ops`, differentiated with ATen's formulas);
- otherwise a backend module (the numba loops, the torch path or the Triton kernels), in one of four ways:
  - nothing needs a gradient (eval under ``no_grad``, or no input requires grad): the backend's forward, called
    directly; nothing is saved;
  - eager autograd: :class:`_NormFunction`, whose backward is the backend's hand-derived backward; the forward saves
    ``(x, mean, rstd)`` and the backward recomputes ``xhat``. In both, the backend's forward also folds the batch's
    statistics into the running buffers (one compiled call on the CPU);
  - under ``torch.compile``: two ``torch.library`` custom ops (``normlab::norm_forward`` and its autograd formula
    ``normlab::norm_backward``) around the same functions, so ``fullgraph=True`` sees one op per direction;
  - under ``torch.export`` (and so ONNX), where no running buffers are updated: the torch path's textbook forward,
    plain aten ops that every exporter translates.

Double backward (``create_graph=True``) falls back to autograd through the torch path's textbook forward (so it
also differentiates how mean and rstd depend on x); the native node does the same through ATen's ops, and the
ATen path has ATen's formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from normlab import activations, backend, spec, torch_ops
from normlab.spec import LEAKY_SLOPE, Call, Running


class _NormFunction(torch.autograd.Function):
    """Eager autograd around one backend: ``forward(x, w, b, call, stats, running, impl)`` gives ``y``; the running
    buffers (or None) take the batch's statistics."""

    @staticmethod
    def forward(ctx, x, w, b, call: Call, stats, running, impl: ModuleType):
        y, mean, rstd, _ = impl.forward(x, w, b, call, stats, running)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.call, ctx.impl = call, impl
        ctx.set_materialize_grads(False)  # no zeros for a dy that never comes
        # y may be a view (a reshape of the backend's output), which autograd forbids the next layer to modify in
        # place (nn.ReLU(inplace=True), as in torchvision's ResNets); detach() is the same data, not a view
        return y.detach()

    @staticmethod
    def backward(ctx, dy):
        if dy is None:
            return (None,) * 7
        x, w, b, mean, rstd = ctx.saved_tensors
        return _grads(ctx.impl, ctx.call, ctx.needs_input_grad, dy, x, w, b, mean, rstd) + (None,) * 4


def _grads(impl, call: Call, need, dy, x, w, b, mean, rstd):
    """``(dx, dw, db)`` for the inputs that ``need`` them; dw and db in w's and b's shapes."""
    if torch.is_grad_enabled():  # create_graph=True: autograd through the textbook forward
        return _autograd_backward(call, need, dy, x, w, b, mean, rstd)
    dx, dw, db = impl.backward(dy, x, w, b, mean, rstd, call, need[0])
    if need[1] and w.dim() > 1:  # backends return flat (G*K,); layer norm's w is (*D)
        dw = dw.reshape(w.shape)
    if need[2] and b.dim() > 1:
        db = db.reshape(b.shape)
    return dx, dw if need[1] else None, db if need[2] else None


def _autograd_backward(call: Call, need, dy, x, w, b, mean, rstd):
    # Given statistics are constants: detached, or autograd would walk back into this very op.
    stats = None if call.use_input_stats else (mean.detach(), rstd.detach().pow(-2) - call.eps)
    y = torch_ops.forward_autograd(x, w, b, call, stats)
    inputs = (x, w, b)
    wrt = [t for t, n in zip(inputs, need) if n and t is not None]
    grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if (n and t is not None) else None for t, n in zip(inputs, need))


# ---- the same functions as custom ops, for torch.compile ---------------------------------------------------------
# A Call travels as primitives (the shape comes with x): kind, groups (0: not group norm), normalized_ndim (0: not
# layer norm), eps, activation, placement, negative_slope, and use_input_stats (given stats or not).


def _op_args(call: Call) -> tuple:
    p = call.plan
    return (p.kind, p.G if p.kind == "group" else 0, p.normalized_ndim, call.eps, call.activation, call.placement,
            call.negative_slope)


def _op_call(x, kind, groups, normalized_ndim, eps, activation, placement, negative_slope, use_input_stats) -> Call:
    return spec.call(kind, tuple(x.shape), eps, activation, placement, negative_slope, use_input_stats,
                     groups or None, normalized_ndim or None)


def _call(*args, **kwargs) -> Call:
    """:func:`normlab.spec.call`; under torch.compile its uncached builder, which dynamo traces (not the cache)."""
    return (spec.make_call if torch.compiler.is_compiling() else spec.call)(*args, **kwargs)


def _op_plan(x, kind, groups, normalized_ndim) -> spec.Plan:
    return spec.plan(kind, x.shape, groups=groups or None, normalized_ndim=normalized_ndim or None)


@torch.library.custom_op("normlab::norm_forward", mutates_args=())
def _norm_forward_op(
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
    negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd, var)``: the norm of x, with its own statistics or the given ``(stat_mean, stat_var)``."""
    given = stat_mean is not None
    call = _op_call(x, kind, groups, normalized_ndim, eps, activation, placement, negative_slope, not given)
    stats = (stat_mean, stat_var) if given else None
    y, mean, rstd, var = backend.select(x, call.plan).forward(x, w, b, call, stats)
    if given:  # an op's outputs may not alias its inputs
        mean, var = mean.clone(), var.clone()
    return y, mean, rstd, var


@_norm_forward_op.register_fake
def _(x, w, b, stat_mean, stat_var, kind, groups, normalized_ndim, eps, activation, placement, negative_slope):
    p = _op_plan(x, kind, groups, normalized_ndim)
    stat = x.new_empty(p.stat_shape, dtype=torch_ops.compute_dtype(x.dtype))
    mean = stat if stat_mean is None else torch.empty_like(stat_mean)
    var = torch.empty_like(stat) if stat_var is None else torch.empty_like(stat_var)
    return torch.empty_like(x, memory_format=torch_ops.output_format(x, p)), mean, torch.empty_like(stat), var


@torch.library.custom_op("normlab::norm_backward", mutates_args=())
def _norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    kind: str,
    groups: int,
    normalized_ndim: int,
    eps: float,
    activation: str | None,
    placement: str,
    negative_slope: float,
    use_input_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)``, the hand-derived gradients; dw/db are empty when w/b are None."""
    call = _op_call(x, kind, groups, normalized_ndim, eps, activation, placement, negative_slope, use_input_stats)
    dx, dw, db = backend.select(x, call.plan).backward(dy, x, w, b, mean, rstd, call)
    return dx, (x.new_empty(0) if dw is None else dw), (x.new_empty(0) if db is None else db)


@_norm_backward_op.register_fake
def _(dy, x, w, b, mean, rstd, kind, groups, normalized_ndim, eps, activation, placement, negative_slope,
      use_input_stats):
    p = _op_plan(x, kind, groups, normalized_ndim)
    dx = torch.empty_like(x, memory_format=torch_ops.output_format(x, p))
    dw = x.new_empty(0) if w is None else w.new_empty(p.affine_size)
    db = x.new_empty(0) if b is None else b.new_empty(p.affine_size)
    return dx, dw, db


def _op_setup_context(ctx, inputs, output):
    x, w, b, stat_mean, _, *args = inputs
    _, mean, rstd, _ = output
    ctx.save_for_backward(x, w, b, mean, rstd)
    ctx.args = (*args, stat_mean is None)


def _op_backward(ctx, dy, _dmean, _drstd, _dvar):
    x, w, b, mean, rstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    if torch.is_grad_enabled():
        dx, dw, db = _autograd_backward(_op_call(x, *ctx.args), need, dy, x, w, b, mean, rstd)
    else:
        dx, dw, db = _norm_backward_op(dy, x, w, b, mean, rstd, *ctx.args)
        dw = dw.reshape(w.shape) if need[1] else None
        db = db.reshape(b.shape) if need[2] else None
    return (dx if need[0] else None, dw, db) + (None,) * 9


_norm_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


# ---- one norm call ------------------------------------------------------------------------------------------------

def _norm(x, w, b, call: Call, stats=None, running: Running | None = None) -> torch.Tensor:
    """One norm call: with the input's own statistics (folded into ``running`` when given), or with given ``stats =
    (mean, var)``."""
    if torch.compiler.is_compiling():
        if running is None and torch.compiler.is_exporting():
            # torch.export / ONNX: plain aten ops, which every exporter and runtime knows (the custom op has no
            # ONNX translation); nothing to save for a backward, as export graphs are inference graphs
            return torch_ops.forward_autograd(x, w, b, call, stats)
        y, mean, _, var = _norm_forward_op(x, w, b, *(stats or (None, None)), *_op_args(call))
        if running is not None:  # the op may not mutate its inputs: the update is traced torch ops
            torch_ops.update_running_stats(running, mean, var, call.plan.m)
        return y
    path = backend.graph_path(x, w, b, call, stats, running)
    if path is not None:
        return path.norm(x, w, b, call, stats, running)
    impl = backend.select(x, call.plan)
    if backend.wants_grad(x, w, b):
        return _NormFunction.apply(x, w, b, call, stats, running, impl)
    return impl.forward(x, w, b, call, stats, running)[0]


class _StatsNormFunction(torch.autograd.Function):
    """:class:`_NormFunction` that also returns the input's own statistics ``(mean, var)`` (not differentiable):
    ``forward(x, w, b, call, impl)`` gives ``(y, mean, var)``."""

    @staticmethod
    def forward(ctx, x, w, b, call: Call, impl: ModuleType):
        y, mean, rstd, var = impl.forward(x, w, b, call)
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.call, ctx.impl = call, impl
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # _dmean, _dvar arrive as None, not as two zeros allocated per step
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if dy is None:
            return (None,) * 5
        x, w, b, mean, rstd = ctx.saved_tensors
        return _grads(ctx.impl, ctx.call, ctx.needs_input_grad, dy, x, w, b, mean, rstd) + (None, None)


def _norm_stats(x, w, b, call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_norm` with the input's own statistics, also returning them: ``(y, mean, var)``, the statistics of
    shape ``call.plan.stat_shape`` (biased variance), for an update the caller makes."""
    if torch.compiler.is_compiling():
        y, mean, _, var = _norm_forward_op(x, w, b, None, None, *_op_args(call))
        return y, mean, var
    impl = backend.select(x, call.plan)
    if backend.wants_grad(x, w, b):
        return _StatsNormFunction.apply(x, w, b, call, impl)
    y, mean, _, var = impl.forward(x, w, b, call)
    return y, mean, var


# ---- ghost batch norm: each virtual batch of v samples normalized with its own statistics --------------------------
# Virtual batch j of x (n, C, *S) holds samples j*v .. j*v+v-1; the k = n/v virtual batches are normalized by one
# norm call over a rearranged copy of x (spec's (N, G, K, R) view cannot pool over a part of N):
# - channels innermost in memory ((N, C) and channels_last): batch norm of (v, k*C, R), whose k*C "channels" are
#   (virtual batch, channel) pairs, stored channels innermost (the backends' fast row sweep), weight repeated k times;
# - otherwise: instance norm of (k, C, v*R), each instance one virtual batch, with the per-channel weight.


def _virtual(x: torch.Tensor, v: int) -> tuple[torch.Tensor, str]:
    """``x`` ``(n, C, *S)`` (n a multiple of v) rearranged (one copy) for one norm call, and that call's kind."""
    n, c = x.shape[0], x.shape[1]
    k, r = n // v, x.numel() // max(n * c, 1)
    if x.dim() == 2 or torch_ops.is_channels_last(x):  # memory (n, *S, C)
        xv = x.movedim(1, -1).reshape(k, v, r, c).permute(1, 2, 0, 3).contiguous()      # (v, R, k, C)
        xv = xv.reshape(v, r, k * c).movedim(-1, 1)                                      # (v, k*C, R) R-major
        return (xv.unsqueeze(-1) if r > 1 else xv.squeeze(-1)), "batch"                # channels_last or 2-D
    return x.reshape(k, v, c, r).transpose(1, 2).reshape(k, c, v * r), "instance"        # (k, C, v*R)


def _unvirtual(y: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`_virtual`: back to ``like``'s shape and memory format."""
    n, c = like.shape[0], like.shape[1]
    if kind == "instance":                                                               # y (k, C, v*R)
        k = y.shape[0]
        return y.reshape(k, c, n // k, -1).transpose(1, 2).reshape(like.shape)
    v = y.shape[0]                                                                       # y (v, k*C, R[, 1])
    y = y.reshape(v, y.shape[1], -1).movedim(1, -1)                                      # (v, R, k*C)
    y = y.reshape(v, y.shape[1], n // v, c).permute(2, 0, 1, 3)                          # (k, v, R, C)
    return y.reshape(n, *like.shape[2:], c).movedim(-1, 1)


def _ghost_batch_norm(input, weight, bias, v: int, call: Call, running: Running | None) -> torch.Tensor:
    """Ghost batch norm (training): the whole virtual batches in one norm call, a smaller last one (the remainder)
    in one more; then one running-statistics update from all virtual batches' statistics, each weighed by its
    number of samples (see :func:`batch_norm`)."""
    # int(): under torch.compile with dynamic shapes, a graph per batch size (the virtual batches' split depends on
    # it) rather than symbolic reshapes, which took minutes to trace
    n, c = int(input.shape[0]), int(input.shape[1])
    full = n - n % v
    parts = [(input[:full], v)] if full else []
    if n > full:
        parts.append((input[full:], n - full))
    ys, stats = [], []
    for part, size in parts:  # one or two calls, never one per virtual batch
        xv, kind = _virtual(part, size)
        pcall = _call(kind, tuple(xv.shape), call.eps, call.activation, call.placement, call.negative_slope)
        if pcall.plan.m == 1:
            raise ValueError(
                f"ghost batch norm: a virtual batch of {size} sample(s) of input size {tuple(input.shape)} has 1 value "
                "per channel; expected more than 1 value per channel when training"
            )
        k = part.shape[0] // size
        w, b = weight, bias
        if kind == "batch" and k > 1:
            w, b = (None if weight is None else weight.repeat(k)), (None if bias is None else bias.repeat(k))
        y, mean, var = _norm_stats(xv, w, b, pcall)
        ys.append(_unvirtual(y, part, kind))
        stats.append((mean.reshape(-1, c), var.reshape(-1, c), size, pcall.plan.m))
    if running is not None:
        _fold_virtual(running, stats, n)
    return ys[0] if len(ys) == 1 else torch.cat(ys)


@torch.no_grad()
def _fold_virtual(running: Running, stats, n: int) -> None:
    """Fold the virtual batches' statistics into ``running``: the means and the unbiased variances of the virtual
    batches, averaged with weights ``size / n``. ``stats``: ``(mean, var, size, m)`` per call, mean and biased var
    ``(n_virtual, C)``."""
    mean = sum(mu.sum(0) * size for mu, _, size, _ in stats) / n                     # (C,)
    var = sum(v.sum(0) * (size * m / (m - 1)) for _, v, size, m in stats) / n       # (C,) unbiased
    torch_ops.fold_running_stats(running, mean, var)


# ---- argument checks ------------------------------------------------------------------------------------------------

def _check_tensor(input) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got dtype {input.dtype}")


def _check_shapes(shape: tuple[int, ...], what, *named) -> None:
    """Each given ``(name, tensor)`` must have ``shape``; the error names the argument, the expected and the actual
    shape, and says what the shape is (``what``: text, or a function giving it, called only on failure)."""
    for name, t in named:
        if t is not None and t.shape != shape:  # torch.Size is a tuple
            what = what() if callable(what) else what
            raise ValueError(f"{name} must have shape {shape} ({what}), got shape {tuple(t.shape)}")


def _per_channel(input: torch.Tensor, p: spec.Plan, *named) -> None:
    _check_shapes((p.affine_size,), lambda: f"one per channel of the input of shape {tuple(input.shape)}", *named)


def _autocast_fp32(*tensors):
    """``tensors`` as CUDA's autocast hands them to torch's group and layer norm, which it runs in float32 (its fp32
    list, aten/src/ATen/autocast_mode.cpp): half-precision ones in float32 while it is on; else as they are. Batch and
    instance norm, and every norm under CPU autocast, run in the input's dtype there, and so here."""
    if not (tensors[0].is_cuda and torch.is_autocast_enabled("cuda")):  # is_cuda: the cheap test first
        return tensors
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def _running_stats_call(kind, input, use_input_stats, momentum, eps, activation, placement, negative_slope,
                        running_mean, running_var, weight, bias) -> Call:
    """The checked Call of batch or instance norm, whose running buffers, weight and bias hold one value per
    channel."""
    _check_tensor(input)
    spec.check_momentum(momentum)
    call = _call(kind, input.shape, eps, activation, placement, negative_slope, use_input_stats)
    c = (call.plan.affine_size,)
    for t in (running_mean, running_var, weight, bias):  # the cheap test on every call; the message on failure
        if t is not None and t.shape != c:
            _per_channel(input, call.plan, ("running_mean", running_mean), ("running_var", running_var),
                         ("weight", weight), ("bias", bias))
    return call


# ---- the four norms ---------------------------------------------------------------------------------------------

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
    negative_slope: float = LEAKY_SLOPE,
    num_batches_tracked: torch.Tensor | None = None,
    num_skipped: torch.Tensor | None = None,
    virtual_batch_size: int | None = None,
) -> torch.Tensor:
    """Batch norm of ``input`` ``(N, C, *S)``, as :func:`torch.nn.functional.batch_norm`, plus a fused activation.

    In training, statistics are the batch's own (per channel over N and S) and, when ``running_mean`` and
    ``running_var`` are given, are folded into them (see :func:`normlab.torch_ops.update_running_stats`); in eval,
    the running statistics normalize. Output: same shape, dtype and memory format as ``input``.

    Extras beyond torch (keyword-only, used by :mod:`normlab.nn`): ``negative_slope`` of ``"leaky_relu"``;
    ``num_batches_tracked`` enables ``momentum=None`` (cumulative average) and is incremented per folded batch;
    ``num_skipped`` counts batches whose non-finite statistics were kept out of the running buffers. ``momentum``
    must lie in [0, 1] (torch accepts any value).

    Ghost batch norm (Hoffer et al. 2017), ``virtual_batch_size=v``: in training, samples ``j·v .. j·v+v-1`` form
    virtual batch j, normalized with its own statistics (per channel over its v samples and S); when v does not
    divide N the last virtual batch is smaller, and v >= N is plain batch norm. The running buffers take one update
    per call: the mean of the virtual batches' means and of their unbiased variances, each virtual batch weighed
    by its number of samples (equal weights when v divides N). Eval mode ignores it.
    """
    call = _running_stats_call("batch", input, bool(training), momentum, eps, activation, placement, negative_slope,
                               running_mean, running_var, weight, bias)
    p = call.plan
    if virtual_batch_size is not None:
        spec.check_virtual_batch_size(virtual_batch_size)
    if (running_mean is None) != (running_var is None):
        missing = "running_var" if running_var is None else "running_mean"
        raise ValueError(f"running_mean and running_var must both be given or both be None; got {missing}=None")
    if training:
        if momentum is None and num_batches_tracked is None and running_mean is not None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        if p.m == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        running = None
        if running_mean is not None and p.numel > 0:
            running = Running(running_mean, running_var, momentum, num_batches_tracked, num_skipped)
        elif num_batches_tracked is not None:  # an empty batch changes no statistic but counts, as in torch
            num_batches_tracked.add_(1)
        if virtual_batch_size is not None and virtual_batch_size < p.N:
            return _ghost_batch_norm(input, weight, bias, virtual_batch_size, call, running)
        return _norm(input, weight, bias, call, running=running)
    if running_mean is None:
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and running_var")
    return _norm(input, weight, bias, call, (running_mean, running_var))


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.01,
    eps: float = 1e-5,
    rmax: float | torch.Tensor = 3.0,
    dmax: float | torch.Tensor = 5.0,
    activation: str | None = None,
    placement: str = "before",
    *,
    negative_slope: float = LEAKY_SLOPE,
    num_batches_tracked: torch.Tensor | None = None,
    num_skipped: torch.Tensor | None = None,
) -> torch.Tensor:
    """Batch renormalization (Ioffe 2017) of ``input`` ``(N, C, *S)``; in eval mode plain batch norm.

    In training, with the batch's per-channel ``mean``, ``sigma_b = sqrt(var + eps)`` and the running statistics'
    ``sigma = sqrt(running_var + eps)``::

        r = clip(sigma_b / sigma, 1/rmax, rmax),  d = clip((mean - running_mean) / sigma, -dmax, dmax)
        y = (xhat · r + d) · w + b                  xhat = (x - mean) / sigma_b

    r and d are constants of the backward (stop-gradient); the running buffers (required) then take the batch's
    statistics as in :func:`batch_norm`. Since r and d are per-channel constants, this is batch norm with the
    weight ``w · r`` and bias ``b + w · d``, and that is how it runs: two extra passes over the input for the batch
    statistics, then the fused norm. ``rmax >= 1`` and ``dmax >= 0`` are numbers or 0-D tensors (checked when
    numbers). With ``placement="after"`` the statistics are those of ``f(input)``, as in :func:`batch_norm`.
    """
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm needs running_mean and running_var (r and d are taken from them)")
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, activation,
                          placement, negative_slope=negative_slope)
    tensor = torch.Tensor
    spec.check_renorm_limits(1 if isinstance(rmax, tensor) else rmax, 0 if isinstance(dmax, tensor) else dmax)
    call = _running_stats_call("batch", input, True, momentum, eps, activation, placement, negative_slope,
                               running_mean, running_var, weight, bias)
    r, d = _renorm_rd(input, running_mean, running_var, rmax, dmax, call)
    if weight is not None:
        r, d = weight * r, weight * d                                     # w' = w·r, b' = b + w·d
    bias = d if bias is None else bias + d
    return batch_norm(input, running_mean, running_var, r, bias, True, momentum, eps, activation, placement,
                      negative_slope=negative_slope, num_batches_tracked=num_batches_tracked, num_skipped=num_skipped)


@torch.no_grad()
def _renorm_rd(input, running_mean, running_var, rmax, dmax, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch renorm's ``(r, d)``, ``(C,)`` each in the running buffers' dtype, computed before the buffers take this
    batch: detached, so constants of the backward."""
    p = call.plan
    a = torch_ops.view4(input, p).to(torch_ops.compute_dtype(input.dtype))   # (N, C, 1, R)
    f = activations.get(call.activation, call.negative_slope)
    if f is not None and call.placement == "after":
        a = f.fn(a)
    mean = a.mean(p.stat_axes, keepdim=True)                                 # (1, C, 1, 1)
    var = (a - mean).square().mean(p.stat_axes)                              # (1, C) two passes: torch.var_mean
    # over these axes took 26 ms on (32, 64, 28, 28) float32 where the two passes take a few
    rdt = running_mean.dtype
    args = (mean.reshape(-1).to(rdt), var.reshape(-1).to(rdt), running_mean, running_var, rmax, dmax, call.eps)
    # Under torch.compile r and d come from an op of their own: AOTAutograd's partitioner would otherwise recompute
    # them in the backward from the running buffers, which the forward has updated by then (pytorch#197039).
    if not torch.compiler.is_compiling():
        return _renorm_rd_impl(*args)
    rmax, dmax = (t if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=rdt) for t in (rmax, dmax))
    return _renorm_rd_op(*args[:4], rmax, dmax, call.eps)


def _renorm_rd_impl(mean, var, running_mean, running_var, rmax, dmax, eps: float):
    """``r = clip(σB / σ, 1/rmax, rmax)``, ``d = clip((μB - μ) / σ, -dmax, dmax)``; all ``(C,)`` (rmax, dmax: 0-D
    tensors or numbers)."""
    sigma = (running_var + eps).sqrt()                                        # (C,) σ
    r = ((var + eps).sqrt() / sigma).clamp(1 / rmax, rmax)                   # (C,)
    d = ((mean - running_mean) / sigma).clamp(-dmax, dmax)                  # (C,)
    return r, d


@torch.library.custom_op("normlab::renorm_rd", mutates_args=())
def _renorm_rd_op(
    mean: torch.Tensor,
    var: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    rmax: torch.Tensor,
    dmax: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_renorm_rd_impl` as one op (rmax and dmax as 0-D tensors)."""
    return _renorm_rd_impl(mean, var, running_mean, running_var, rmax, dmax, eps)


@_renorm_rd_op.register_fake
def _(mean, var, running_mean, running_var, rmax, dmax, eps):
    return torch.empty_like(mean), torch.empty_like(mean)


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
    *,
    negative_slope: float = LEAKY_SLOPE,
) -> torch.Tensor:
    """Instance norm of ``input`` ``(N, C, *S)``, as :func:`torch.nn.functional.instance_norm`.

    Statistics per sample and channel over S. With ``use_input_stats`` and running buffers, the buffers receive the
    batch average of the per-instance mean and unbiased variance; without it, the buffers normalize.
    """
    call = _running_stats_call("instance", input, bool(use_input_stats), momentum, eps, activation, placement,
                               negative_slope, running_mean, running_var, weight, bias)
    p = call.plan
    if use_input_stats:
        if p.R == 1:
            raise ValueError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
        running = Running(running_mean, running_var, momentum) if running_mean is not None and p.numel > 0 else None
        return _norm(input, weight, bias, call, running=running)
    if running_mean is None or running_var is None:
        raise ValueError("instance_norm with use_input_stats=False needs running_mean and running_var")
    return _norm(input, weight, bias, call, (running_mean, running_var))


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
    *,
    negative_slope: float = LEAKY_SLOPE,
) -> torch.Tensor:
    """Group norm of ``input`` ``(N, C, *S)``, as :func:`torch.nn.functional.group_norm`.

    Statistics per sample over each group of ``C / num_groups`` channels and S; weight and bias per channel.
    """
    _check_tensor(input)
    input, weight, bias = _autocast_fp32(input, weight, bias)
    call = _call("group", input.shape, eps, activation, placement, negative_slope, groups=num_groups)
    _per_channel(input, call.plan, ("weight", weight), ("bias", bias))
    return _norm(input, weight, bias, call)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    activation: str | None = None,
    placement: str = "before",
    *,
    negative_slope: float = LEAKY_SLOPE,
) -> torch.Tensor:
    """Layer norm of ``input`` ``(*B, *D)`` over its trailing dims ``D = normalized_shape``, as torch's.

    Weight and bias have shape ``normalized_shape`` (one value per normalized element).
    """
    _check_tensor(input)
    input, weight, bias = _autocast_fp32(input, weight, bias)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    k = len(shape)
    if k == 0 or input.dim() < k or input.shape[input.dim() - k :] != shape:
        raise ValueError(
            f"layer_norm: input must end in normalized_shape {shape}, got input of shape {tuple(input.shape)}"
        )
    _check_shapes(shape, "normalized_shape", ("weight", weight), ("bias", bias))
    call = _call("layer", input.shape, eps, activation, placement, negative_slope, normalized_ndim=k)
    return _norm(input, weight, bias, call)
