"""The torch backend: forward and hand-derived backward of every norm, as plain tensor operations.

This is the fallback and the reference among the fast paths; the Triton kernels (:mod:`normlab.kernels`) honour
the same two functions' contract. Math (names as in the code; sums over a statistic's ``m`` values)::

    mean = E[a], var = E[(a - mean)^2], rstd = (var + eps)^-1/2     a = x, or f(x) when the activation is "after"
    z = (a - mean) * rstd * w + b                                     y = f(z) when "before", else z
    dz = dy * f'(z) ("before") or dy
    db = Σ dz,  dw = Σ dz * xhat                                      over each affine entry's positions
    da = rstd * (dz w - mean(dz w) - xhat * mean(dz w xhat))           batch statistics
    da = rstd * dz w                                                  given (running) statistics: constants
    dx = da * f'(x) ("after") or da

Statistics are float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs; outputs are cast
back to the input dtype once. ``(a - mean)`` is always formed before scaling, never ``E[a^2] - E[a]^2`` or
``a * scale - mean * scale``, so data with a large mean and a small spread keeps its precision.
"""

from __future__ import annotations

import torch

from normlab.activations import ACTIVATIONS
from normlab.spec import Plan


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_channels_last(t: torch.Tensor) -> bool:
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    if t.dim() == 5:
        return t.is_contiguous(memory_format=torch.channels_last_3d) and not t.is_contiguous()
    return False


def view4(t: torch.Tensor, p: Plan) -> torch.Tensor:
    """``t`` of logical shape ``p.shape`` as ``(N, G, K, R)``, without a copy for contiguous and channels_last."""
    if p.kind != "layer" and _is_channels_last(t):
        # memory order (N, *S, C) = (N, R, G, K): a permuted view, no copy
        return t.movedim(1, -1).reshape(p.N, p.R, p.G, p.K).permute(0, 2, 3, 1)
    return t.reshape(p.view_shape)


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a norm's output (and of dx) for input ``x``: channels_last stays channels_last."""
    if _is_channels_last(x):
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def unview(t4: torch.Tensor, like: torch.Tensor, p: Plan) -> torch.Tensor:
    """Inverse of :func:`view4`: back to ``p.shape`` in the memory format of ``like``."""
    if p.kind != "layer" and _is_channels_last(like):
        s = like.shape
        out = t4.permute(0, 3, 1, 2).reshape(s[0], *s[2:], s[1]).movedim(-1, 1)
        return out.contiguous(memory_format=output_format(like))
    return t4.reshape(p.shape).contiguous()


def _stat4(t: torch.Tensor, p: Plan, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).reshape(p.stat_shape[0], p.G, 1, 1)


def _affine4(t: torch.Tensor | None, p: Plan, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).reshape(1, p.G, p.K, 1)


def forward(x, w, b, p: Plan, eps: float, activation=None, placement="before", stats=None):
    """Normalize ``x`` (shape ``p.shape``); returns ``(y, mean, var)``.

    Args:
        x: input tensor; contiguous or channels_last.
        w, b: affine weight and bias, ``p.affine_size`` entries each, or None.
        p: the plan (:func:`normlab.spec.plan`).
        eps: added to the variance.
        activation, placement: optional fused activation name, ``"before"`` or ``"after"`` the norm.
        stats: None to use the input's own statistics, or ``(mean, var)`` to normalize with (running
            statistics), each with ``prod(p.stat_shape)`` entries.

    Returns:
        y like x (same dtype and memory format); mean and biased var of shape ``p.stat_shape`` in the
        statistics dtype (for given stats: those stats).
    """
    f = ACTIVATIONS[activation] if activation else None
    cdt = compute_dtype(x.dtype)
    a = view4(x, p).to(cdt)                                             # (N, G, K, R)
    if f is not None and placement == "after":
        a = f.fn(a)
    if stats is None and p.numel == 0:  # an empty batch has no statistics (and updates nothing)
        mean = torch.full((p.stat_shape[0], p.G, 1, 1), float("nan"), dtype=cdt, device=x.device)
        var = mean.clone()
        xc = a - mean
    elif stats is None:
        # Shifted data: d = a - (one value of each statistic's set) is exact and of the spread's size, so its
        # mean and squares keep their digits even when |mean| >> std; on the CPU this is also far faster than
        # torch.var_mean over non-trailing axes.
        shift = a[:, :, :1, :1] if not p.pool_batch else a[:1, :, :1, :1]  # (N|1, G, 1, 1)
        d = a - shift                                                   # (N, G, K, R)
        d_mean = d.mean(p.stat_axes, keepdim=True)                      # (N|1, G, 1, 1)
        xc = d - d_mean                                                 # (N, G, K, R)
        var = (xc * xc).mean(p.stat_axes, keepdim=True)                 # (N|1, G, 1, 1)
        mean = shift + d_mean
    else:
        mean, var = _stat4(stats[0], p, cdt), _stat4(stats[1], p, cdt)
        xc = a - mean
    rstd = (var + eps).rsqrt()                                          # (N|1, G, 1, 1)
    w4, b4 = _affine4(w, p, cdt), _affine4(b, p, cdt)
    scale = rstd if w4 is None else rstd * w4                           # (N|1, G, K|1, 1)
    z = xc * scale if b4 is None else torch.addcmul(b4, xc, scale)      # (N, G, K, R)
    if f is not None and placement == "before":
        z = f.fn(z)
    y = unview(z.to(x.dtype), x, p)
    return y, mean.reshape(p.stat_shape), var.reshape(p.stat_shape)


def backward(dy, x, w, b, mean, rstd, p: Plan, activation=None, placement="before", batch_stats=True):
    """Gradients of :func:`forward`; returns ``(dx, dw, db)`` (dw, db None when w, b are None).

    Args:
        dy: gradient of y, shape ``p.shape`` (any memory format).
        x, w, b: the forward's inputs.
        mean, rstd: the forward's statistics, shape ``p.stat_shape``.
        batch_stats: True when the statistics were the input's own (they then carry gradient), False when
            they were given constants (eval mode).
    """
    f = ACTIVATIONS[activation] if activation else None
    cdt = mean.dtype
    x4 = view4(x, p).to(cdt)                                            # (N, G, K, R)
    a = f.fn(x4) if (f is not None and placement == "after") else x4
    mean4, rstd4 = _stat4(mean, p, cdt), _stat4(rstd, p, cdt)          # (N|1, G, 1, 1)
    w4 = _affine4(w, p, cdt)                                            # (1, G, K, 1) or None
    xc = a - mean4                                                      # (N, G, K, R)
    # The saved float32 mean is rounded (by up to half an ulp of |mean|, a lot when |mean| >> std); its exact
    # offset from x's mean, delta, is folded into the per-statistic coefficients below at the cost of one read.
    delta = xc.mean(p.stat_axes, keepdim=True) if batch_stats else torch.zeros_like(mean4)  # (N|1, G, 1, 1)
    dz = view4(dy, p).to(cdt)                                           # (N, G, K, R)
    if f is not None and placement == "before":
        scale = rstd4 if w4 is None else rstd4 * w4
        shift = -delta * scale if b is None else _affine4(b, p, cdt) - delta * scale
        dz = dz * f.grad(torch.addcmul(shift, xc, scale))               # f'(z), z recomputed
    # Per (statistic, affine entry) sums; everything after them is (N|1, G, K, 1)-sized.
    sum_axes = (0, 3) if p.pool_batch else (3,)
    sdz = dz.sum(sum_axes, keepdim=True)                                # (N|1, G, K, 1)  Σ dz
    sdzxc = (dz * xc).sum(sum_axes, keepdim=True) - delta * sdz         # (N|1, G, K, 1)  Σ dz (x - mean)
    db = sdz.sum(0).reshape(-1) if b is not None else None              # (G*K,)
    dw = (sdzxc * rstd4).sum(0).reshape(-1) if w is not None else None  # (G*K,)  Σ dz xhat
    wk = 1.0 if w4 is None else w4                                      # (1, G, K, 1)
    if batch_stats:
        # da = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) = A dz + B (x - mean) + C, with dxhat = dz w
        c1 = (wk * sdz).sum(2, keepdim=True) / p.m                      # (N|1, G, 1, 1)  mean(dxhat)
        c2 = (wk * sdzxc).sum(2, keepdim=True) * rstd4 / p.m            # (N|1, G, 1, 1)  mean(dxhat xhat)
        coef_x = -(rstd4 * rstd4 * c2)                                  # B
        coef_1 = -(rstd4 * c1) - coef_x * delta                         # C, with x - mean = xc - delta
        da = torch.addcmul(coef_1, coef_x, xc)                          # (N, G, K, R)
        da = torch.addcmul(da, rstd4 * wk, dz)
    else:
        da = dz * (rstd4 * wk)
    if f is not None and placement == "after":
        da = da * f.grad(x4)
    dx = unview(da.to(x.dtype), x, p)
    return dx, (None if dw is None else dw.to(w.dtype)), (None if db is None else db.to(b.dtype))
