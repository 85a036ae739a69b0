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


def _channels_last_view(t: torch.Tensor, p: Plan) -> bool:
    # Layer norm's (N, 1, K, 1) view runs along the logical trailing dims: a channels_last input is read through a
    # contiguous copy, and its output is contiguous, as torch's layer_norm gives.
    return p.kind != "layer" and _is_channels_last(t)


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
    return t.to(dtype).reshape(p.stat_shape[0], p.G, 1, 1)


def _affine4(t: torch.Tensor | None, p: Plan, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).reshape(1, p.G, p.K, 1)


# Rows of the (N, G, K, R) view processed at a time: about 2^18 values (1 MiB of float32), so the temporaries of
# a chunk stay in cache. Each direction reads its inputs twice from memory (statistics/sums, then the output),
# like torch's own kernels, instead of once per tensor operation.
CHUNK_VALUES = 1 << 18


def _chunks(p: Plan):
    rows = max(1, CHUNK_VALUES // max(p.G * p.K * p.R, 1))
    return [(n0, min(n0 + rows, p.N)) for n0 in range(0, p.N, rows)] or [(0, 0)]  # an empty batch: one empty chunk


def _scratch(x4: torch.Tensor, chunks, dtype: torch.dtype):
    """``out(i, n0, n1)``: rows n0:n1 of reusable buffer ``i`` (0 or 1), laid out like x's chunks; None (a fresh
    tensor) when the input is a single chunk, whose temporaries are made once anyway.

    Fresh ~1 MiB temporaries per tensor operation cost page faults whenever the allocator hands back memory from the
    OS, which made the timings of large inputs jump by 2-3x from one call to the next.
    """
    if len(chunks) == 1:
        return lambda i, n0, n1: None
    n0, n1 = chunks[0]
    bufs = [torch.empty_like(x4[n0:n1], dtype=dtype) for _ in range(2)]
    return lambda i, n0, n1: bufs[i][: n1 - n0]


def _rows(t: torch.Tensor, n0: int, n1: int) -> torch.Tensor:
    """Rows n0:n1 of a per-sample ``(N, ...)`` statistic, as a view; a pooled ``(1, ...)`` one serves every row."""
    return t if t.shape[0] == 1 else t[n0:n1]


def _act_in(a: torch.Tensor, f, placement: str) -> torch.Tensor:
    return f.fn(a) if (f is not None and placement == "after") else a


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
    x4 = view4(x, p)                                                    # (N, G, K, R)
    chunks = _chunks(p)
    out = _scratch(x4, chunks, cdt)
    if stats is not None:
        mean, var = _stat4(stats[0], p, cdt), _stat4(stats[1], p, cdt)
        shift, d_mean, kept = mean, torch.zeros_like(mean), None
    else:
        # Shifted sums: d = a - shift, with shift a rough mean of each statistic's values, keeps the digits of
        # the spread even when |mean| >> std (E[x^2] - E[x]^2 would not). Pooled statistics share the first
        # chunk's shift; per-sample ones take each row's own.
        s1 = torch.zeros(p.stat_shape[0], p.G, 1, 1, dtype=cdt, device=x.device)  # Σ d
        s2 = torch.zeros_like(s1)                                                   # Σ d²
        shift = torch.zeros_like(s1)
        if p.pool_batch and p.numel:
            n0, n1 = chunks[0]
            shift = _act_in(x4[n0:n1].to(cdt), f, placement).mean(p.stat_axes, keepdim=True)
        for n0, n1 in chunks:
            a = _act_in(x4[n0:n1].to(cdt), f, placement)                 # (rows, G, K, R)
            if not p.pool_batch:
                shift[n0:n1] = a.mean(p.stat_axes, keepdim=True)
            d = torch.sub(a, _rows(shift, n0, n1), out=out(0, n0, n1))
            _rows(s1, n0, n1).add_(d.sum(p.stat_axes, keepdim=True))
            _rows(s2, n0, n1).add_(torch.mul(d, d, out=out(1, n0, n1)).sum(p.stat_axes, keepdim=True))
        kept = (n0, d)  # the last chunk's d (in buffer 0) serves the output sweep too: all of it for a small input
        d_mean = s1 / p.m                                                # (N|1, G, 1, 1); NaN for an empty batch
        mean = shift + d_mean
        var = (s2 / p.m - d_mean * d_mean).clamp_(min=0)
    rstd = (var + eps).rsqrt()                                          # (N|1, G, 1, 1)
    w4, b4 = _affine4(w, p, cdt), _affine4(b, p, cdt)
    scale = rstd if w4 is None else rstd * w4                           # (N|1, G, K|1, 1)
    # z = (a - shift) * scale + (b - d_mean * scale): the float32 sum shift + d_mean is never formed, so its
    # rounding does not reach the output.
    offset = -d_mean * scale if b4 is None else b4 - d_mean * scale     # (N|1, G, K|1, 1)
    y = torch.empty_like(x, memory_format=output_format(x, p))
    y4 = view4(y, p)
    for n0, n1 in chunks:
        if kept is not None and kept[0] == n0:
            d = kept[1]
        else:
            d = torch.sub(_act_in(x4[n0:n1].to(cdt), f, placement), _rows(shift, n0, n1), out=out(1, n0, n1))
        offset_r, scale_r = _rows(offset, n0, n1), _rows(scale, n0, n1)
        if f is None or placement == "after":
            torch.addcmul(offset_r, d, scale_r, out=y4[n0:n1])          # (rows, G, K, R)
        else:
            y4[n0:n1] = f.fn(torch.addcmul(offset_r, d, scale_r))
    return y, mean.reshape(p.stat_shape), var.reshape(p.stat_shape)


def forward_autograd(x, w, b, p: Plan, eps: float, activation=None, placement="before", stats=None):
    """:func:`forward`'s output as plain differentiable tensor operations (the textbook formula, unchunked).

    Used only for double backward, where autograd must also see how mean and rstd depend on x.
    """
    f = ACTIVATIONS[activation] if activation else None
    cdt = compute_dtype(x.dtype)
    a = _act_in(view4(x, p).to(cdt), f, placement)                      # (N, G, K, R)
    if stats is None:
        mean = a.mean(p.stat_axes, keepdim=True)
        var = ((a - mean) ** 2).mean(p.stat_axes, keepdim=True)
    else:
        mean, var = _stat4(stats[0], p, cdt), _stat4(stats[1], p, cdt)
    z = (a - mean) * (var + eps).rsqrt()
    if w is not None:
        z = z * _affine4(w, p, cdt)
    if b is not None:
        z = z + _affine4(b, p, cdt)
    z = z if (f is None or placement == "after") else f.fn(z)
    return unview(z.to(x.dtype), x, p)


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
    x4, dy4 = view4(x, p), view4(dy, p)                                 # (N, G, K, R)
    mean4, rstd4 = _stat4(mean, p, cdt), _stat4(rstd, p, cdt)          # (N|1, G, 1, 1)
    w4, b4 = _affine4(w, p, cdt), _affine4(b, p, cdt)                  # (1, G, K, 1) or None
    wk = 1.0 if w4 is None else w4
    chunks = _chunks(p)
    out = _scratch(x4, chunks, cdt)

    def centered(n0, n1, i):
        """a - mean for rows n0:n1, into buffer ``i``: (rows, G, K, R)."""
        return torch.sub(_act_in(x4[n0:n1].to(cdt), f, placement), _rows(mean4, n0, n1), out=out(i, n0, n1))

    def chunk(n0, n1, delta, i):
        """x - mean (into buffer ``i``) and dz = ∂l/∂z for rows n0:n1 (recomputed in each sweep rather than stored)."""
        xc = centered(n0, n1, i)
        dz = dy4[n0:n1].to(cdt)
        if f is not None and placement == "before":
            scale = _rows(rstd4, n0, n1) * wk
            delta_r = _rows(delta, n0, n1)
            shift = -delta_r * scale if b4 is None else b4 - delta_r * scale
            dz = dz * f.grad(torch.addcmul(shift, xc, scale))            # f'(z), z recomputed
        return xc, dz

    # Sweep 1: per (statistic, affine entry) sums. The saved float32 mean is rounded (by up to half an ulp of
    # |mean|, a lot when |mean| >> std); delta, its exact offset from x's mean, is folded into the coefficients.
    # Only f'(z) before the norm needs delta ahead of the sums (z depends on it): then it takes a pass of its own.
    sum_axes = (0, 3) if p.pool_batch else (3,)
    sdz = torch.zeros((mean4.shape[0], p.G, p.K, 1), dtype=cdt, device=x.device)  # Σ dz
    sdzxc = torch.zeros_like(sdz)                                       # Σ dz (x - mean)
    delta = torch.zeros_like(mean4)                                     # m · E[x - mean], then E[x - mean]
    delta_first = batch_stats and f is not None and placement == "before"
    if delta_first:
        for n0, n1 in chunks:
            _rows(delta, n0, n1).add_(centered(n0, n1, 1).sum(p.stat_axes, keepdim=True))
        delta /= p.m
    for n0, n1 in chunks:
        xc, dz = chunk(n0, n1, delta, 0)
        if batch_stats and not delta_first:
            _rows(delta, n0, n1).add_(xc.sum(p.stat_axes, keepdim=True))
        _rows(sdz, n0, n1).add_(dz.sum(sum_axes, keepdim=True))
        _rows(sdzxc, n0, n1).add_(torch.mul(dz, xc, out=out(1, n0, n1)).sum(sum_axes, keepdim=True))
    kept = (n0, xc, dz)  # the last chunk (xc in buffer 0) serves sweep 2 too: all of it for a small input
    if batch_stats and not delta_first:
        delta /= p.m
    sdzxc -= delta * sdz
    db = sdz.sum(0).reshape(-1) if b is not None else None              # (G*K,)
    dw = (sdzxc * rstd4).sum(0).reshape(-1) if w is not None else None  # (G*K,)  Σ dz xhat
    if batch_stats:
        # da = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) = A dz + B (x - mean) + C, with dxhat = dz w
        c1 = (wk * sdz).sum(2, keepdim=True) / p.m                      # (N|1, G, 1, 1)  mean(dxhat)
        c2 = (wk * sdzxc).sum(2, keepdim=True) * rstd4 / p.m            # (N|1, G, 1, 1)  mean(dxhat xhat)
        coef_x = -(rstd4 * rstd4 * c2)                                  # B
        coef_1 = -(rstd4 * c1) - coef_x * delta                         # C, with x - mean = xc - delta
    else:
        coef_x = coef_1 = torch.zeros_like(mean4)
    coef_dz = rstd4 * wk                                                # A
    # Sweep 2: dx.
    dx = torch.empty_like(x, memory_format=output_format(x, p))
    dx4 = view4(dx, p)
    for n0, n1 in chunks:
        xc, dz = kept[1:] if kept[0] == n0 else chunk(n0, n1, delta, 1)
        da = torch.addcmul(_rows(coef_1, n0, n1), _rows(coef_x, n0, n1), xc, out=xc)  # xc's last use: in place
        da.addcmul_(_rows(coef_dz, n0, n1), dz)                          # (rows, G, K, R)
        if f is not None and placement == "after":
            da.mul_(f.grad(x4[n0:n1].to(cdt)))
        dx4[n0:n1] = da
    return dx, (None if dw is None else dw.to(w.dtype)), (None if db is None else db.to(b.dtype))
