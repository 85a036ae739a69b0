"""The torch backend: forward and hand-derived backward of every norm, as plain tensor operations.

The fallback wherever no compiled path runs (half-precision CPU inputs; CUDA without Triton), and the readable form
of what every backend computes. Every backend module has these functions, with this contract:

- ``forward(x, w, b, call, stats=None, running=None) -> (y, mean, rstd, var)``
- ``backward(dy, x, w, b, mean, rstd, call, need_dx=True) -> (dx, dw, db)``
- ``update_running_stats(running, mean, var, m)``

Math (names as in the code; sums over a statistic's ``m`` values)::

    mean = E[a], var = E[(a - mean)^2], rstd = (var + eps)^-1/2     a = x, or f(x) when the activation is "after"
    z = (a - mean) * rstd * w + b                                     y = f(z) when "before", else z
    dz = dy * f'(z) ("before") or dy
    db = Σ dz,  dw = Σ dz * xhat                                      over each affine entry's positions
    da = rstd * (dz w - mean(dz w) - xhat * mean(dz w xhat))           the input's own statistics
    da = rstd * dz w                                                  given (running) statistics: constants
    dx = da * f'(x) ("after") or da

Statistics are float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs; outputs are cast back
to the input dtype once. A large mean never swamps a small spread: the statistics are sums of ``d = a - shift``
(``shift`` the rounded two-pass mean), the output is ``(d - E[d]) * scale + b`` (the rounded mean is never
subtracted), and the backward re-centres ``a - mean`` by ``delta = E[a - mean]``, the rounding of the saved mean.
"""

from __future__ import annotations

import torch

from normlab import activations
from normlab.spec import Call, Plan, Running


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is a 4-D/5-D tensor stored channels_last (and not also contiguous)."""
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return False


def _channels_last_view(t: torch.Tensor, p: Plan) -> bool:
    # Layer norm's (N, 1, K, 1) view runs along the logical trailing dims: a channels_last input is read through a
    # contiguous copy, and its output is contiguous, as torch's layer_norm gives.
    return p.kind != "layer" and is_channels_last(t)


def view4(t: torch.Tensor, p: Plan) -> torch.Tensor:
    """``t`` of logical shape ``p.shape`` as ``(N, G, K, R)``, without a copy for contiguous and channels_last."""
    if _channels_last_view(t, p):
        # memory order (N, *S, C) = (N, R, G, K): a permuted view, no copy
        return t.movedim(1, -1).reshape(p.N, p.R, p.G, p.K).permute(0, 2, 3, 1)
    return t.reshape(p.view_shape)


def output_format(x: torch.Tensor, p: Plan) -> torch.memory_format:
    """The memory format of a norm's output (and of dx) for input ``x``: channels_last stays channels_last (but
    for layer norm, whose output is contiguous, as torch's)."""
    if _channels_last_view(x, p):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def unview(t4: torch.Tensor, like: torch.Tensor, p: Plan) -> torch.Tensor:
    """Inverse of :func:`view4`: back to ``p.shape`` in the memory format :func:`output_format` gives for ``like``."""
    if _channels_last_view(like, p):
        s = like.shape
        out = t4.permute(0, 3, 1, 2).reshape(s[0], *s[2:], s[1]).movedim(-1, 1)
        return out.contiguous(memory_format=output_format(like, p))
    return t4.reshape(p.shape).contiguous()


def _stat4(t: torch.Tensor, p: Plan, dtype: torch.dtype) -> torch.Tensor:
    """A statistic (``(C,)`` running buffer or ``p.stat_shape``) as ``(N|1, G, 1, 1)``."""
    return t.to(dtype).reshape(-1, p.G, 1, 1)


def _affine4(t: torch.Tensor | None, p: Plan, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).reshape(1, p.G, p.K, 1)


def _normalized(x: torch.Tensor, call: Call) -> torch.Tensor:
    """What gets normalized, as ``(N, G, K, R)`` in the statistics dtype: ``x``, or ``f(x)`` when "after"."""
    a = view4(x, call.plan).to(compute_dtype(x.dtype))
    f = activations.get(call.activation, call.negative_slope)
    return f.fn(a) if (f is not None and call.placement == "after") else a


def _output(z: torch.Tensor, x: torch.Tensor, call: Call) -> torch.Tensor:
    """``f(z)`` when the activation comes before the norm, else ``z``; back to x's shape, dtype and format."""
    f = activations.get(call.activation, call.negative_slope)
    y = f.fn(z) if (f is not None and call.placement == "before") else z
    return unview(y.to(x.dtype), x, call.plan)


def forward(x, w, b, call: Call, stats=None, running: Running | None = None):
    """Normalize ``x`` (shape ``call.plan.shape``); returns ``(y, mean, rstd, var)``.

    Args:
        x: input tensor, any strides.
        w, b: affine weight and bias, ``p.affine_size`` entries each, or None.
        call: the :class:`~normlab.spec.Call`.
        stats: None to normalize with the input's own statistics (``call.use_input_stats``), else ``(mean, var)``
            to normalize with (running statistics): ``(C,)`` or ``p.stat_shape``.
        running: running buffers that take this batch's statistics (:func:`update_running_stats`), or None.

    Returns:
        y like x (dtype; memory format as :func:`output_format`); mean, rstd and biased var of shape
        ``p.stat_shape`` in the statistics dtype (for given stats: those stats, as given).
    """
    p = call.plan
    a = _normalized(x, call)                                           # (N, G, K, R)
    if call.use_input_stats:
        shift = a.mean(p.stat_axes, keepdim=True)                      # (N|1, G, 1, 1) rounded two-pass mean
        d = a - shift                                                  # (N, G, K, R)
        d_mean = d.mean(p.stat_axes, keepdim=True)                     # (N|1, G, 1, 1) E[a] - shift
        var = (d.square().mean(p.stat_axes, keepdim=True) - d_mean.square()).clamp(min=0)
        mean = shift + d_mean
    else:
        mean, var = stats
        d, d_mean = a - _stat4(mean, p, a.dtype), 0.0                  # (N, G, K, R)
        var = _stat4(var, p, a.dtype)
    rstd = (var + call.eps).rsqrt()                                    # (N|1, G, 1, 1)
    w4, b4 = _affine4(w, p, a.dtype), _affine4(b, p, a.dtype)
    z = (d - d_mean) * (rstd if w4 is None else rstd * w4)             # (N, G, K, R)
    y = _output(z if b4 is None else z + b4, x, call)
    if not call.use_input_stats:
        return y, mean, rstd.reshape(-1, p.G).expand(p.stat_shape), stats[1]
    mean, var = mean.reshape(p.stat_shape), var.reshape(p.stat_shape)
    if running is not None:
        update_running_stats(running, mean, var, p.m)
    return y, mean, rstd.reshape(p.stat_shape), var


def backward(dy, x, w, b, mean, rstd, call: Call, need_dx: bool = True):
    """Gradients of :func:`forward`; returns ``(dx, dw, db)`` (dx None unless ``need_dx``; dw, db None when w, b
    are None, else flat ``(G*K,)`` in their dtypes).

    Args:
        dy: gradient of y, shape ``p.shape`` (any memory format).
        x, w, b: the forward's inputs.
        mean, rstd: the forward's statistics (``p.stat_shape``, or ``(C,)`` given ones).
        call: the forward's :class:`~normlab.spec.Call`; with ``use_input_stats`` False the statistics are
            constants (eval mode).
    """
    p = call.plan
    f = activations.get(call.activation, call.negative_slope)
    a = _normalized(x, call)                                           # (N, G, K, R)
    cdt = a.dtype
    dy4 = view4(dy, p).to(cdt)                                         # (N, G, K, R)
    rstd4 = _stat4(rstd, p, cdt)                                       # (N|1, G, 1, 1)
    w4, b4 = _affine4(w, p, cdt), _affine4(b, p, cdt)                  # (1, G, K, 1) or None
    xc = a - _stat4(mean, p, cdt)                                      # (N, G, K, R)
    if call.use_input_stats:
        xc = xc - xc.mean(p.stat_axes, keepdim=True)                   # re-centred: the saved mean is rounded
    xhat = xc * rstd4                                                  # (N, G, K, R)
    dz = dy4
    if f is not None and call.placement == "before":
        z = xhat if w4 is None else xhat * w4
        dz = dy4 * f.grad(z if b4 is None else z + b4)                 # f'(z), z recomputed
    db = dz.sum(p.affine_axes).reshape(-1) if b is not None else None  # (G*K,)
    dw = (dz * xhat).sum(p.affine_axes).reshape(-1) if w is not None else None  # (G*K,)
    dx = None
    if need_dx:
        dxhat = dz if w4 is None else dz * w4                          # (N, G, K, R)
        if call.use_input_stats:
            dxhat = (dxhat - dxhat.mean(p.stat_axes, keepdim=True)
                     - xhat * (dxhat * xhat).mean(p.stat_axes, keepdim=True))
        da = dxhat * rstd4                                             # (N, G, K, R)
        if f is not None and call.placement == "after":
            da = da * f.grad(view4(x, p).to(cdt))
        dx = unview(da.to(x.dtype), x, p)
    return dx, (None if dw is None else dw.to(w.dtype)), (None if db is None else db.to(b.dtype))


def forward_autograd(x, w, b, call: Call, stats=None) -> torch.Tensor:
    """:func:`forward`'s output as plain differentiable tensor operations (the textbook formula).

    Used for double backward, where autograd must also see how mean and rstd depend on x, and for export (plain
    aten ops, see :func:`normlab.functional._norm`).
    """
    p = call.plan
    a = _normalized(x, call)                                           # (N, G, K, R)
    if call.use_input_stats:
        mean = a.mean(p.stat_axes, keepdim=True)
        var = ((a - mean) ** 2).mean(p.stat_axes, keepdim=True)
    else:
        mean, var = _stat4(stats[0], p, a.dtype), _stat4(stats[1], p, a.dtype)
    z = (a - mean) * (var + call.eps).rsqrt()
    if w is not None:
        z = z * _affine4(w, p, a.dtype)
    if b is not None:
        z = z + _affine4(b, p, a.dtype)
    return _output(z, x, call)


@torch.no_grad()
def update_running_stats(running: Running, mean: torch.Tensor, var: torch.Tensor, m: int) -> None:
    """Fold one batch's statistics into the running buffers, in place, unless they are not finite.

    ``running = (1 - factor) · running + factor · batch`` with ``factor = running.momentum``, or
    ``1 / num_batches_tracked`` (a cumulative average) when the momentum is None. ``running.var`` receives the
    unbiased batch variance ``var · m / (m - 1)``. Per-sample statistics (instance norm, ``(N, C)``) are averaged
    over the batch first, as torch does. A batch whose mean or variance is not finite leaves every buffer untouched
    (torch would poison them with NaN) and adds one to ``num_skipped``; the choice is made on the device, without a
    host sync.

    Args:
        running: the buffers and momentum (:class:`~normlab.spec.Running`).
        mean, var: the batch's mean and biased variance, ``(S, C)``.
        m: values per statistic in the batch.
    """
    fold_running_stats(running, mean.mean(0), var.mean(0) * (m / max(m - 1, 1)))


@torch.no_grad()
def fold_running_stats(running: Running, mean: torch.Tensor, var: torch.Tensor) -> None:
    """:func:`update_running_stats` given the batch's ``(C,)`` mean and unbiased variance: the guarded moving
    average, in place."""
    if running.momentum is None and running.num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    rdt = running.mean.dtype
    batch = torch.stack((mean, var)).to(rdt)                            # (2, C)
    finite = batch.isfinite().all()
    if running.num_batches_tracked is not None:
        running.num_batches_tracked.add_(finite)
    if running.num_skipped is not None:
        running.num_skipped.add_(~finite)
    factor = running.momentum
    if factor is None:
        factor = 1.0 / running.num_batches_tracked.clamp(min=1).to(rdt)
    old = torch.stack((running.mean, running.var))                     # (2, C)
    new = torch.where(finite, torch.lerp(old, batch, factor), old)
    running.mean.copy_(new[0])
    running.var.copy_(new[1])
