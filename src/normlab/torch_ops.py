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


def unview(t4: torch.Tensor, like: torch.Tensor, p: Plan) -> torch.Tensor:
    """Inverse of :func:`view4`: back to ``p.shape`` in the memory format of ``like``."""
    if p.kind != "layer" and _is_channels_last(like):
        s = like.shape
        out = t4.permute(0, 3, 1, 2).reshape(s[0], *s[2:], s[1]).movedim(-1, 1)
        fmt = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
        return out.contiguous(memory_format=fmt)
    return t4.reshape(p.shape)


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
        mean = var = torch.full((p.stat_shape[0], p.G, 1, 1), float("nan"), dtype=cdt, device=x.device)
    elif stats is None:
        var, mean = torch.var_mean(a, dim=p.stat_axes, keepdim=True, correction=0)  # (N|1, G, 1, 1)
    else:
        mean, var = _stat4(stats[0], p, cdt), _stat4(stats[1], p, cdt)
    rstd = (var + eps).rsqrt()                                          # (N|1, G, 1, 1)
    w4, b4 = _affine4(w, p, cdt), _affine4(b, p, cdt)
    scale = rstd if w4 is None else rstd * w4                           # (N|1, G, K|1, 1)
    z = (a - mean) * scale if b4 is None else torch.addcmul(b4, a - mean, scale)  # (N, G, K, R)
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
    xhat = (a - mean4) * rstd4                                          # (N, G, K, R), recomputed
    dz = view4(dy, p).to(cdt)                                           # (N, G, K, R)
    if f is not None and placement == "before":
        z = xhat if w4 is None else xhat * w4
        if b is not None:
            z = z + _affine4(b, p, cdt)
        dz = dz * f.grad(z)
    db = dz.sum(p.affine_axes).reshape(-1) if b is not None else None  # (G*K,)
    dw = (dz * xhat).sum(p.affine_axes).reshape(-1) if w is not None else None
    dxhat = dz if w4 is None else dz * w4                               # (N, G, K, R)
    if batch_stats:
        c1 = dxhat.mean(p.stat_axes, keepdim=True)                      # (N|1, G, 1, 1)
        c2 = (dxhat * xhat).mean(p.stat_axes, keepdim=True)             # (N|1, G, 1, 1)
        da = (dxhat - c1 - xhat * c2) * rstd4
    else:
        da = dxhat * rstd4
    if f is not None and placement == "after":
        da = da * f.grad(x4)
    dx = unview(da.to(x.dtype), x, p)
    return dx, (None if dw is None else dw.to(w.dtype)), (None if db is None else db.to(b.dtype))
