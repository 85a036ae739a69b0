r"""The numba backend: compiled CPU loops for float32 and float64 inputs.

The same functions as :mod:`normlab.torch_ops`, with the same contract, math and names (see there), plus
:func:`supports`. Each direction reads ``x`` (and ``dy``) from memory about as often as torch's own CPU kernels do,
with the activation fused, the statistics taken by shifted sums (``d = a - shift``, ``shift`` the mean of a
statistic's first tile, so a large mean never swamps a small spread) and the output formed as
``((a - shift) - dmean) * rstd * w + b``, never from the rounded mean.

Where a statistic's values lie in memory decides the loop family (:func:`_channels`):

- blocks: each statistic is a set of contiguous blocks of the input in memory order ``(N, C, R)``: one block of
  ``K * R`` values per sample (instance, group and layer norm of a contiguous input), or ``N`` blocks of ``R``
  values (batch norm of a contiguous input with positions). A task owns whole statistics and makes every pass over
  one statistic before the next, so the later passes read from cache, not memory.
- channels: batch statistics with channels innermost (``(N, C)`` inputs and channels_last): every row of ``C``
  values feeds every statistic. Tasks take ranges of rows and keep per-channel partial sums; a small merge turns
  them into per-channel coefficients between the passes.

Every pass works tile by tile (:data:`TILE` values, in L1), one plain loop per step, so the loops vectorize and
the activation's switch sits outside them. Per-element arithmetic runs in x's dtype; sums run in x's dtype within
a tile and in float64 across tiles; statistics and coefficients are float64 until stored.

Threads: each pass is a serial loop over a range of its ``T`` tasks. One compiled driver per family and direction
(``_blocks_forward_run`` etc.) runs the passes in turn: each once on the calling thread when one thread suffices (a
single task, i.e. small inputs, or torch set to one thread: no thread is woken), else through its ``_par`` entry, a
``prange`` over contiguous task ranges, one per thread of ``torch.get_num_threads()``. numba's OpenMP layer binds
to the libgomp torch loads, so these threads are torch's own pool rather than a second pool contending for the
cores. ``T`` and every merge order depend on the shape only, so results are bit-identical from run to run and
across thread counts.

The saved float32 ``mean`` is the exact mean rounded, off by ``delta`` (at most half an ulp of ``|mean|``). As in
the torch path, the backward measures ``delta = E[a - mean]`` in its sums pass and folds it into the
coefficients; only ``f'(z)`` before the norm needs it ahead of that pass, and then takes a pass of its own when
``delta * rstd`` could exceed float32 resolution (``|mean| * rstd > 1``).
"""

from __future__ import annotations

import math
import threading

import numba
import numba.np.ufunc.parallel
import numpy as np
import torch
from numba import prange, types
from numba.extending import overload

from normlab import torch_ops
from normlab.spec import Call, Plan, Running
from normlab.torch_ops import is_channels_last

# Values per task, as a target: large enough that a task's fixed cost is noise, small enough to spread the work
# over the cores. Read at call time (tests shrink it to exercise many tasks on small inputs).
TASK_VALUES = 1 << 15
# Values per tile: each pass works on tiles of a task's scratch (a few KiB, in L1) with one plain loop per step.
# Also the longest run summed in x's dtype before the sum moves to float64. Compiled in.
TILE = 1024

# Activation codes of the compiled loops; names as in normlab.spec.ACTIVATIONS (a test checks they agree).
_NONE, _RELU, _LEAKY, _SIGMOID, _TANH, _SILU, _GELU = range(7)
CODES = {None: _NONE, "relu": _RELU, "leaky_relu": _LEAKY, "sigmoid": _SIGMOID, "tanh": _TANH, "silu": _SILU,
         "gelu": _GELU}

# Fast-math flags are per instruction and survive inlining. Reassociation, which sums need to vectorize, is given
# only to the reduction helpers, which add up values they are handed (no subtraction inside for it to regroup):
# elsewhere it could turn ((a - shift) - dmean) into a - (shift + dmean), the very rounding the formulas avoid.
# NaN and inf are honoured everywhere.
_FASTMATH = {"contract", "nsz"}
_jit = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
_jit_par = numba.njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
_inline = numba.njit(fastmath=_FASTMATH)  # helpers: compiled into their callers, where LLVM inlines them
_reduce = numba.njit(fastmath=_FASTMATH | {"reassoc"})


# ---- tiles: one activation, in place -------------------------------------------------------------------------

@_inline
def _act_(v, act, slope):
    """``v[:] = f(v)`` for the activation code ``act`` (``_NONE``: nothing to do)."""
    one = v.dtype.type(1)
    zero = v.dtype.type(0)
    if act == _RELU:
        for i in range(v.shape[0]):
            if v[i] <= zero:  # NaN stays NaN, as torch.relu
                v[i] = zero
    elif act == _LEAKY:
        s = v.dtype.type(slope)
        for i in range(v.shape[0]):
            if v[i] <= zero:
                v[i] *= s
    elif act == _SIGMOID:
        for i in range(v.shape[0]):
            v[i] = one / (one + math.exp(-v[i]))
    elif act == _TANH:
        for i in range(v.shape[0]):
            v[i] = math.tanh(v[i])
    elif act == _SILU:
        for i in range(v.shape[0]):
            v[i] = v[i] / (one + math.exp(-v[i]))
    elif act == _GELU:
        for i in range(v.shape[0]):
            v[i] = v.dtype.type(0.5) * v[i] * (one + math.erf(v[i] * v.dtype.type(0.7071067811865476)))


@_inline
def _grad_(v, act, slope):
    """``v[:] = f'(v)``: the activation's derivative at the pre-activation values ``v``."""
    one = v.dtype.type(1)
    zero = v.dtype.type(0)
    if act == _RELU:
        for i in range(v.shape[0]):
            v[i] = one if v[i] > zero else zero
    elif act == _LEAKY:
        s = v.dtype.type(slope)
        for i in range(v.shape[0]):
            v[i] = one if v[i] > zero else s
    elif act == _SIGMOID:
        for i in range(v.shape[0]):
            e = one / (one + math.exp(-v[i]))
            v[i] = e * (one - e)
    elif act == _TANH:
        for i in range(v.shape[0]):
            e = math.tanh(v[i])
            v[i] = one - e * e
    elif act == _SILU:
        for i in range(v.shape[0]):
            e = one / (one + math.exp(-v[i]))
            v[i] = e * (one + v[i] * (one - e))
    elif act == _GELU:
        for i in range(v.shape[0]):
            cdf = v.dtype.type(0.5) * (one + math.erf(v[i] * v.dtype.type(0.7071067811865476)))
            v[i] = cdf + v[i] * math.exp(v.dtype.type(-0.5) * v[i] * v[i]) * v.dtype.type(0.3989422804014327)
    else:
        v[:] = one


@_inline
def _tile(x, i0, n, buf, act_in, slope):
    """What gets normalized at ``x[i0:i0+n]``: a view of x, or ``f(x)`` in ``buf`` (activation after the norm)."""
    if act_in == _NONE:
        return x[i0:i0 + n]
    a = buf[:n]
    a[:] = x[i0:i0 + n]
    _act_(a, act_in, slope)
    return a


@_reduce
def _sum2(v):
    """``(Σ v, Σ v²)`` over one tile, in v's dtype (a tile is short)."""
    t1 = v.dtype.type(0)
    t2 = t1
    for i in range(v.shape[0]):
        t1 += v[i]
        t2 += v[i] * v[i]
    return t1, t2


@_reduce
def _sum3(u, v):
    """``(Σ u, Σ u v, Σ v)`` over one tile."""
    t1 = u.dtype.type(0)
    t2 = t1
    t3 = t1
    for i in range(u.shape[0]):
        t1 += u[i]
        t2 += u[i] * v[i]
        t3 += v[i]
    return t1, t2, t3


@_reduce
def _wsum3(w, u, v):
    """``(Σ w u, Σ w u v, Σ v)`` over one tile."""
    t1 = u.dtype.type(0)
    t2 = t1
    t3 = t1
    for i in range(u.shape[0]):
        wu = w[i] * u[i]
        t1 += wu
        t2 += wu * v[i]
        t3 += v[i]
    return t1, t2, t3


@_inline
def _sums(a, shift, buf):
    """``(Σ d, Σ d²)`` over one tile, ``d = a - shift`` (formed in ``buf`` first, outside the reduction)."""
    d = buf[:a.shape[0]]
    for i in range(a.shape[0]):
        d[i] = a[i] - shift
    return _sum2(d)


@_inline
def _tile_mean(a):
    """The mean of one tile, in a's dtype: a statistic's shift (it need only be near the mean)."""
    return _sum2(a)[0] / a.dtype.type(a.shape[0])


@_inline
def _variance(s1, s2, m):
    """``(E[d], E[d²] - E[d]²)`` from shifted sums; a rounding-negative variance is 0 and NaN stays NaN."""
    dmean = s1 / m
    var = s2 / m - dmean * dmean
    return dmean, (0.0 if var < 0 else var)


@_inline
def _after_grad(out, x, i0, buf, act_in, slope):
    """``out *= f'(x[i0:...])`` when the activation comes after the norm."""
    if act_in != _NONE:
        g = buf[:out.shape[0]]
        g[:] = x[i0:i0 + out.shape[0]]
        _grad_(g, act_in, slope)
        for i in range(out.shape[0]):
            out[i] *= g[i]


def _at(v, i):
    """``v[i]`` for an array, ``v`` for a scalar: lets one loop serve a tile of one channel (scalar parameters) and a
    tile of many (one parameter per position)."""


@overload(_at, inline="always")
def _at_impl(v, i):
    if isinstance(v, types.Array):
        return lambda v, i: v[i]
    return lambda v, i: v


@_inline
def _rep(v, r):
    """``v`` (one value per channel) repeated for ``r`` rows of channels, in v's dtype."""
    C = v.shape[0]
    out = np.empty(r * C, v.dtype)
    for q in range(r):
        out[q * C:(q + 1) * C] = v
    return out


@_inline
def _fold(acc, part):
    """Add a tile accumulator (rows of C channels) into per-channel float64 partial sums ``part`` (C,); zero it."""
    C = part.shape[0]
    for q in range(acc.shape[0] // C):
        row = acc[q * C:(q + 1) * C]
        for c in range(C):
            part[c] += row[c]
    acc[:] = 0


@_inline
def _row_z(wt, bt, rs, zl, sc_v, bz_v, act_z):
    """For a row of channels: ``(sc, bz) = (rstd * w, b - zl * rstd * w)``, the scale and offset of the recomputed
    z (filled into the scratch only when f'(z) needs z)."""
    n = wt.shape[0]
    sc, bz = sc_v[:n], bz_v[:n]
    if act_z != _NONE:
        for k in range(n):
            sc[k] = rs * wt[k]
            bz[k] = bt[k] - zl * sc[k]
    return sc, bz


@_inline
def _centered(x, dy, i0, n, mu, sc, bz, bufs, act_in, act_z, slope):
    """For ``x[i0:i0+n]``: ``(a - mu, dz)`` as tile views. ``dz = dy * f'(z)`` with ``z = (a - mu) * sc + bz`` when
    the activation comes before the norm (``bz = b - zl * sc``), else dy's view. ``mu``, ``sc``, ``bz`` are scalars
    (one channel) or vectors (one value per position of the tile). Every backward pass calls this, so all see the
    same ``z``."""
    a = _tile(x, i0, n, bufs[0], act_in, slope)
    xc = bufs[1][:n]
    for i in range(n):
        xc[i] = a[i] - _at(mu, i)
    if act_z == _NONE:
        return xc, dy[i0:i0 + n]
    dz = bufs[2][:n]
    for i in range(n):
        dz[i] = xc[i] * _at(sc, i) + _at(bz, i)
    _grad_(dz, act_z, slope)
    dyt = dy[i0:i0 + n]
    for i in range(n):
        dz[i] *= dyt[i]
    return xc, dz


# ---- blocks: a statistic is contiguous blocks of the (N, C, R) memory -----------------------------------------
# Task t owns statistics [t * NS // T, (t + 1) * NS // T) of the NS = S * G; statistic s = (ns, g) starts at
# ((0 if S == 1 else ns) * C + g * K) * R and has nb blocks of L = K * R values, C * R apart.

@_jit
def _blocks_forward(x, w, b, y, mean, rstd, var, N, S, K, R, use_input_stats, eps, act, after, slope, T, t0, t1):
    """Forward of tasks [t0, t1) over flat ``x`` and ``y`` (``N * C * R``, contiguous); ``mean``, ``rstd``,
    ``var``: ``(S * G,)`` (``mean``, ``var`` given when not ``use_input_stats``); ``w``, ``b``: ``(C,)``."""
    dt = x.dtype.type
    C = w.shape[0]
    G = C // K
    NS = S * G
    nb = N if S == 1 else 1
    L = K * R
    act_in = act if after else _NONE  # what gets normalized: f(x)
    act_out = _NONE if after else act  # the output: f(z)
    buf = np.empty(TILE, x.dtype)
    dbuf = np.empty(TILE, x.dtype)
    for s in range(t0 * NS // T, t1 * NS // T):
        ns = s // G
        c0 = (s - ns * G) * K
        base = ((0 if S == 1 else ns) * C + c0) * R
        if use_input_stats:
            shift = _tile_mean(_tile(x, base, min(TILE, L), buf, act_in, slope))
            s1 = 0.0
            s2 = 0.0
            for i in range(nb):
                start = base + i * C * R
                for i0 in range(start, start + L, TILE):
                    u1, u2 = _sums(_tile(x, i0, min(TILE, start + L - i0), buf, act_in, slope), shift, dbuf)
                    s1 += u1
                    s2 += u2
            dmean, v = _variance(s1, s2, nb * L)
            mean[s] = shift + dmean
            var[s] = v
        else:
            shift = dt(mean[s])
            dmean = 0.0
            v = var[s]
        rstd[s] = 1.0 / math.sqrt(v + eps)
        rs = dt(rstd[s])  # the stored value: the backward uses the same
        dm = dt(dmean)
        for i in range(nb):
            start = base + i * C * R
            if R == 1:  # channels vary along the block (layer norm; group norm of (N, C))
                for k0 in range(0, K, TILE):
                    n = min(TILE, K - k0)
                    a = _tile(x, start + k0, n, buf, act_in, slope)
                    out = y[start + k0:start + k0 + n]
                    wt, bt = w[c0 + k0:c0 + k0 + n], b[c0 + k0:c0 + k0 + n]
                    for k in range(n):
                        out[k] = ((a[k] - shift) - dm) * (rs * wt[k]) + bt[k]
                    _act_(out, act_out, slope)
            else:
                for k in range(K):
                    sc = rs * w[c0 + k]
                    bc = b[c0 + k]
                    j1 = start + (k + 1) * R
                    for i0 in range(start + k * R, j1, TILE):
                        n = min(TILE, j1 - i0)
                        a = _tile(x, i0, n, buf, act_in, slope)
                        out = y[i0:i0 + n]
                        for j in range(n):
                            out[j] = ((a[j] - shift) - dm) * sc + bc
                        _act_(out, act_out, slope)


@_jit
def _blocks_backward(dy, x, w, b, mean, rstd, dx, part, N, S, K, R, use_input_stats, need_dx, act, after, slope,
                     T, t0, t1):
    """Backward of tasks [t0, t1) over flat ``dy``, ``x``, ``dx`` (contiguous); ``part``: ``(T, 2, C)`` float64
    zeros, out: each task's Σ dz xhat and Σ dz per channel (dw, db once added over tasks in order)."""
    dt = x.dtype.type
    C = w.shape[0]
    G = C // K
    NS = S * G
    nb = N if S == 1 else 1
    L = K * R
    m = nb * L
    act_in = act if after else _NONE
    act_z = _NONE if after else act  # f'(z) needed
    bufs = (np.empty(TILE, x.dtype), np.empty(TILE, x.dtype), np.empty(TILE, x.dtype))
    sc_v = np.empty(min(K, TILE), x.dtype)  # R == 1: per position rstd * w, and b - zl * rstd * w
    bz_v = np.empty(min(K, TILE), x.dtype)
    s_dz = np.empty(K)  # one statistic's per-channel sums (R > 1)
    s_dzx = np.empty(K)
    for t in range(t0, t1):
        part_dw = part[t, 0]
        part_db = part[t, 1]
        for s in range(t * NS // T, (t + 1) * NS // T):
            ns = s // G
            c0 = (s - ns * G) * K
            base = ((0 if S == 1 else ns) * C + c0) * R
            mu = dt(mean[s])
            rs = dt(rstd[s])
            # zl: the delta z is recomputed with; measured ahead of the sums only where f'(z) needs it
            zl = 0.0
            early = use_input_stats and act_z != _NONE and abs(mu) * rs > 1
            if early:
                for i in range(nb):
                    start = base + i * C * R
                    for i0 in range(start, start + L, TILE):
                        u1, _ = _sums(_tile(x, i0, min(TILE, start + L - i0), bufs[0], act_in, slope), mu,
                                      bufs[1])
                        zl += u1
                zl /= m
            zl_ = dt(zl)
            c1 = 0.0  # Σ_c w Σ dz
            c2 = 0.0  # Σ_c w Σ dz (a - mu)
            sxc = 0.0  # Σ (a - mu)
            if R > 1:
                s_dz[:] = 0.0
                s_dzx[:] = 0.0
            for i in range(nb):
                start = base + i * C * R
                if R == 1:  # one value per channel: layer norm, group norm of (N, C)
                    for k0 in range(0, K, TILE):
                        n = min(TILE, K - k0)
                        wt = w[c0 + k0:c0 + k0 + n]
                        sc, bz = _row_z(wt, b[c0 + k0:c0 + k0 + n], rs, zl_, sc_v, bz_v, act_z)
                        xc, dz = _centered(x, dy, start + k0, n, mu, sc, bz, bufs, act_in, act_z, slope)
                        u1, u2, u3 = _wsum3(wt, dz, xc)
                        c1 += u1
                        c2 += u2
                        sxc += u3
                else:
                    for k in range(K):
                        sc = rs * w[c0 + k]
                        bz = b[c0 + k] - zl_ * sc
                        j1 = start + (k + 1) * R
                        for i0 in range(start + k * R, j1, TILE):
                            xc, dz = _centered(x, dy, i0, min(TILE, j1 - i0), mu, sc, bz, bufs, act_in, act_z, slope)
                            u1, u2, u3 = _sum3(dz, xc)
                            s_dz[k] += u1
                            s_dzx[k] += u2
                            sxc += u3
            if R > 1:
                for k in range(K):
                    c1 += w[c0 + k] * s_dz[k]
                    c2 += w[c0 + k] * s_dzx[k]
            delta = zl if early else (sxc / m if use_input_stats else 0.0)
            if R > 1:
                for k in range(K):  # Σ dz xhat = rstd Σ dz (a - mu - delta)
                    part_db[c0 + k] += s_dz[k]
                    part_dw[c0 + k] += (s_dzx[k] - delta * s_dz[k]) * rs
            # da = rstd (dz w - mean(dz w) - xhat mean(dz w xhat)) with the input's statistics, rstd dz w with
            # given ones; xhat = (a - mu) rstd - corr
            k1 = dt(rs * c1 / m if use_input_stats else 0.0)
            k2 = dt(rs * rs * (c2 - delta * c1) / m if use_input_stats else 0.0)
            corr = dt(delta * rs)
            for i in range(nb):
                start = base + i * C * R
                if R == 1:
                    for k0 in range(0, K, TILE):
                        n = min(TILE, K - k0)
                        wt = w[c0 + k0:c0 + k0 + n]
                        sc, bz = _row_z(wt, b[c0 + k0:c0 + k0 + n], rs, zl_, sc_v, bz_v, act_z)
                        xc, dz = _centered(x, dy, start + k0, n, mu, sc, bz, bufs, act_in, act_z, slope)
                        pw, pb = part_dw[c0 + k0:c0 + k0 + n], part_db[c0 + k0:c0 + k0 + n]
                        out = dx[start + k0:start + k0 + n] if need_dx else bufs[0][:n]
                        for k in range(n):  # one loop: dw and db partials, and dx
                            xhat = xc[k] * rs - corr
                            pw[k] += dz[k] * xhat
                            pb[k] += dz[k]
                            out[k] = dz[k] * (rs * wt[k]) - k1 - xhat * k2
                        if need_dx:
                            _after_grad(out, x, start + k0, bufs[2], act_in, slope)
                elif need_dx:
                    for k in range(K):
                        sc = rs * w[c0 + k]
                        bz = b[c0 + k] - zl_ * sc
                        j1 = start + (k + 1) * R
                        for i0 in range(start + k * R, j1, TILE):
                            xc, dz = _centered(x, dy, i0, min(TILE, j1 - i0), mu, sc, bz, bufs, act_in, act_z, slope)
                            out = dx[i0:i0 + xc.shape[0]]
                            for j in range(xc.shape[0]):
                                out[j] = dz[j] * sc - k1 - (xc[j] * rs - corr) * k2
                            _after_grad(out, x, i0, bufs[2], act_in, slope)


# ---- channels: batch statistics with channels innermost; task t takes rows [t * M // T, (t + 1) * M // T) -------
# A tile is r = TILE // C whole rows (at least one), flat; per-channel vectors are repeated r times (_rep), so the
# tile loops are the blocks family's flat loops. coef: (7, C) per-channel rows in x's dtype, filled between passes:
_SHIFT, _DMEAN, _SC, _B, _RS, _K1, _K2 = range(7)  # forward: shift, E[a - shift], rstd * w, b
_MU, _BZ, _CORR = _SHIFT, _DMEAN, _B  # backward: mean, b - zl * rstd * w, delta * rstd (plus _RS, _SC, _K1, _K2)


@_jit
def _channels_stats(x, coef, part, act_in, slope, T, t0, t1):
    """Σ (a - shift) and Σ (a - shift)² per channel of tasks [t0, t1) into ``part`` ``(T, 2, C)``. The shift, the
    mean of each channel's first tile of rows, is taken by every task alike (task 0 stores it in coef)."""
    C = coef.shape[1]
    M = x.shape[0] // C
    r = max(1, min(TILE // C, M))  # rows per tile
    buf = np.empty(r * C, x.dtype)
    first = np.zeros(C)
    _fold(_tile(x, 0, min(r, M) * C, buf, act_in, slope).copy(), first)
    shift = (first / min(r, M)).astype(x.dtype)
    if t0 == 0:
        coef[_SHIFT] = shift
    shift_r = _rep(shift, r)
    a1 = np.zeros(r * C, x.dtype)
    a2 = np.zeros(r * C, x.dtype)
    for t in range(t0, t1):
        j1 = (t + 1) * M // T
        tiles = 0
        for j in range(t * M // T, j1, r):
            a = _tile(x, j * C, (min(j + r, j1) - j) * C, buf, act_in, slope)
            for i in range(a.shape[0]):
                d = a[i] - shift_r[i]
                a1[i] += d
                a2[i] += d * d
            tiles += 1
            if tiles % TILE == 0:  # x's dtype over at most TILE values per lane, float64 across
                _fold(a1, part[t, 0])
                _fold(a2, part[t, 1])
        _fold(a1, part[t, 0])
        _fold(a2, part[t, 1])


@_jit
def _channels_forward_coef(part, coef, w, b, mean, rstd, var, M, use_input_stats, eps):
    """Merge the tasks' sums (in task order) into mean, var and rstd, and fill coef's forward rows; with given
    statistics (``mean``, ``var``), only rstd and coef."""
    C = w.shape[0]
    for c in range(C):
        if use_input_stats:
            s1 = 0.0
            s2 = 0.0
            for t in range(part.shape[0]):
                s1 += part[t, 0, c]
                s2 += part[t, 1, c]
            dmean, v = _variance(s1, s2, M)
            mean[c] = coef[_SHIFT, c] + dmean
            var[c] = v
            coef[_DMEAN, c] = dmean
        else:
            coef[_SHIFT, c] = mean[c]
            coef[_DMEAN, c] = 0
        rstd[c] = 1.0 / math.sqrt(var[c] + eps)
        coef[_SC, c] = coef.dtype.type(rstd[c]) * w[c]
        coef[_B, c] = b[c]


@_jit
def _channels_apply(x, y, coef, act_in, act_out, slope, T, t0, t1):
    """``y = f?(((a - shift) - dmean) * sc + b)`` for the rows of tasks [t0, t1)."""
    C = coef.shape[1]
    M = x.shape[0] // C
    r = max(1, min(TILE // C, M))  # rows per tile
    shift_r, dm_r, sc_r, b_r = _rep(coef[_SHIFT], r), _rep(coef[_DMEAN], r), _rep(coef[_SC], r), _rep(coef[_B], r)
    buf = np.empty(r * C, x.dtype)
    j1 = t1 * M // T
    for j in range(t0 * M // T, j1, r):  # tasks own contiguous rows: the range runs straight through them
        n = (min(j + r, j1) - j) * C
        a = _tile(x, j * C, n, buf, act_in, slope)
        out = y[j * C:j * C + n]
        for i in range(n):
            out[i] = ((a[i] - shift_r[i]) - dm_r[i]) * sc_r[i] + b_r[i]
        _act_(out, act_out, slope)


@_jit
def _channels_backward_coef(mean, rstd, w, b, zl, coef):
    """coef's rows for the sums pass: mu, rstd, sc = rstd * w, bz = b - zl * sc. Returns whether some channel has
    ``|mean| * rstd > 1`` (f'(z) then needs zl measured first)."""
    far = False
    for c in range(w.shape[0]):
        coef[_MU, c] = mean[c]
        coef[_RS, c] = rstd[c]
        coef[_SC, c] = coef[_RS, c] * w[c]
        coef[_BZ, c] = b[c] - coef.dtype.type(zl[c]) * coef[_SC, c]
        far = far or abs(coef[_MU, c]) * coef[_RS, c] > 1
    return far


@_jit
def _channels_centered(x, coef, part, act_in, slope, T, t0, t1):
    """Σ (a - mu) per channel of tasks [t0, t1) into ``part[:, 0]`` (the zl pass)."""
    C = coef.shape[1]
    M = x.shape[0] // C
    r = max(1, min(TILE // C, M))  # rows per tile
    mu_r = _rep(coef[_MU], r)
    buf = np.empty(r * C, x.dtype)
    acc = np.zeros(r * C, x.dtype)
    for t in range(t0, t1):
        j1 = (t + 1) * M // T
        for j in range(t * M // T, j1, r):
            a = _tile(x, j * C, (min(j + r, j1) - j) * C, buf, act_in, slope)
            for i in range(a.shape[0]):
                acc[i] += a[i] - mu_r[i]
            _fold(acc, part[t, 0])


@_jit
def _channels_sums(dy, x, coef, part, act_in, act_z, slope, T, t0, t1):
    """Σ dz, Σ dz (a - mu), Σ (a - mu) per channel of tasks [t0, t1) into ``part`` ``(T, 3, C)``."""
    C = coef.shape[1]
    M = x.shape[0] // C
    r = max(1, min(TILE // C, M))  # rows per tile
    mu_r, sc_r, bz_r = _rep(coef[_MU], r), _rep(coef[_SC], r), _rep(coef[_BZ], r)
    bufs = (np.empty(r * C, x.dtype), np.empty(r * C, x.dtype), np.empty(r * C, x.dtype))
    acc = np.zeros((3, r * C), x.dtype)
    for t in range(t0, t1):
        j1 = (t + 1) * M // T
        tiles = 0
        for j in range(t * M // T, j1, r):
            xc, dz = _centered(x, dy, j * C, (min(j + r, j1) - j) * C, mu_r, sc_r, bz_r, bufs, act_in, act_z, slope)
            a0, a1, a2 = acc[0], acc[1], acc[2]
            for i in range(xc.shape[0]):
                a0[i] += dz[i]
                a1[i] += dz[i] * xc[i]
                a2[i] += xc[i]
            tiles += 1
            if tiles % TILE == 0:
                for q in range(3):
                    _fold(acc[q], part[t, q])
        for q in range(3):
            _fold(acc[q], part[t, q])


@_jit
def _channels_backward_merge(part, coef, w, zl, early, M, use_input_stats, dw, db):
    """Merge the tasks' sums (in task order) into dw, db and coef's dx rows k1, k2, corr."""
    for c in range(w.shape[0]):
        sdz = 0.0
        sdzx = 0.0
        sxc = 0.0
        for t in range(part.shape[0]):
            sdz += part[t, 0, c]
            sdzx += part[t, 1, c]
            sxc += part[t, 2, c]
        delta = zl[c] if early else (sxc / M if use_input_stats else 0.0)
        rs = coef[_RS, c]
        db[c] = sdz
        dw[c] = (sdzx - delta * sdz) * rs  # Σ dz xhat
        coef[_K1, c] = rs * w[c] * sdz / M if use_input_stats else 0.0
        coef[_K2, c] = rs * rs * w[c] * (sdzx - delta * sdz) / M if use_input_stats else 0.0
        coef[_CORR, c] = delta * rs


@_jit
def _channels_dx(dy, x, dx, coef, act_in, act_z, slope, T, t0, t1):
    """``dx`` for the rows of tasks [t0, t1): ``dz sc - k1 - xhat k2`` (times f'(x) after the norm)."""
    C = coef.shape[1]
    M = x.shape[0] // C
    r = max(1, min(TILE // C, M))  # rows per tile
    mu_r, sc_r, bz_r, rs_r = _rep(coef[_MU], r), _rep(coef[_SC], r), _rep(coef[_BZ], r), _rep(coef[_RS], r)
    k1_r, k2_r, corr_r = _rep(coef[_K1], r), _rep(coef[_K2], r), _rep(coef[_CORR], r)
    bufs = (np.empty(r * C, x.dtype), np.empty(r * C, x.dtype), np.empty(r * C, x.dtype))
    j1 = t1 * M // T
    for j in range(t0 * M // T, j1, r):
        n = (min(j + r, j1) - j) * C
        xc, dz = _centered(x, dy, j * C, n, mu_r, sc_r, bz_r, bufs, act_in, act_z, slope)
        out = dx[j * C:j * C + n]
        for i in range(n):
            out[i] = dz[i] * sc_r[i] - k1_r[i] - (xc[i] * rs_r[i] - corr_r[i]) * k2_r[i]
        _after_grad(out, x, j * C, bufs[2], act_in, slope)


# ---- running statistics --------------------------------------------------------------------------------------

@_jit
def _update_running(stat, S, running_mean, running_var, m, momentum, cumulative, num_batches_tracked, num_skipped):
    """Fold a batch's statistics (``stat[0]``, ``stat[2]``: mean and biased var, ``S`` rows of C, averaged over the
    rows as torch's instance norm does) into ``(C,)`` running buffers, unless one is not finite. Empty buffers: no
    update. The counters are 0-d arrays (a layer without them passes scratch ones)."""
    if running_mean.size == 0:
        return
    C = running_mean.shape[0]
    rdt = running_mean.dtype.type
    unbias = m / (m - 1) if m > 1 else 1.0
    bm = np.empty(C, running_mean.dtype)
    bv = np.empty(C, running_var.dtype)
    for c in range(C):
        sm = 0.0
        sv = 0.0
        for s in range(S):
            sm += stat[0, s * C + c]
            sv += stat[2, s * C + c]
        bm[c] = sm / S
        bv[c] = sv / S * unbias
        if not (math.isfinite(bm[c]) and math.isfinite(bv[c])):
            num_skipped[()] += 1
            return
    num_batches_tracked[()] += 1
    factor = 1.0 / max(num_batches_tracked[()], 1) if cumulative else momentum
    for c in range(C):
        running_mean[c] = rdt((1.0 - factor) * running_mean[c] + factor * bm[c])
        running_var[c] = rdt((1.0 - factor) * running_var[c] + factor * bv[c])


# ---- threads and drivers --------------------------------------------------------------------------------------
# One parallel entry per pass: a prange over n contiguous ranges of the T tasks (a wrapper generated per kernel would
# not be cached by numba, so they are written out). A driver per family and direction makes the one call from
# Python: its passes run in turn, each serially on the calling thread when n == 1 (no thread woken for small inputs),
# else through its parallel entry; merges run between them.

@_jit_par
def _blocks_forward_par(n, T, *args):
    for i in prange(n):
        _blocks_forward(*args, T, T * i // n, T * (i + 1) // n)


@_jit_par
def _blocks_backward_par(n, T, *args):
    for i in prange(n):
        _blocks_backward(*args, T, T * i // n, T * (i + 1) // n)


@_jit_par
def _channels_stats_par(n, T, *args):
    for i in prange(n):
        _channels_stats(*args, T, T * i // n, T * (i + 1) // n)


@_jit_par
def _channels_apply_par(n, T, *args):
    for i in prange(n):
        _channels_apply(*args, T, T * i // n, T * (i + 1) // n)


@_jit_par
def _channels_centered_par(n, T, *args):
    for i in prange(n):
        _channels_centered(*args, T, T * i // n, T * (i + 1) // n)


@_jit_par
def _channels_sums_par(n, T, *args):
    for i in prange(n):
        _channels_sums(*args, T, T * i // n, T * (i + 1) // n)


@_jit_par
def _channels_dx_par(n, T, *args):
    for i in prange(n):
        _channels_dx(*args, T, T * i // n, T * (i + 1) // n)


@_jit
def _blocks_forward_run(n, T, x, w, b, y, stat, N, S, K, R, use_input_stats, eps, act, after, slope, *running):
    """The blocks family's forward: ``stat`` ``(3, S * G)`` holds mean, rstd, var (mean and var given when not
    ``use_input_stats``); ``running`` as :func:`_update_running` takes it (empty buffers: no update)."""
    if n == 1:
        _blocks_forward(x, w, b, y, stat[0], stat[1], stat[2], N, S, K, R, use_input_stats, eps, act, after, slope,
                        T, 0, T)
    else:
        _blocks_forward_par(n, T, x, w, b, y, stat[0], stat[1], stat[2], N, S, K, R, use_input_stats, eps, act,
                            after, slope)
    _update_running(stat, S, *running)


@_jit
def _channels_forward_run(n, T, x, w, b, y, stat, use_input_stats, eps, act, after, slope, *running):
    """The channels family's forward (``stat`` and ``running`` as for the blocks family)."""
    C = w.shape[0]
    act_in = act if after else _NONE
    act_out = _NONE if after else act
    coef = np.empty((7, C), x.dtype)
    part = np.zeros((T, 2, C))
    if use_input_stats:
        if n == 1:
            _channels_stats(x, coef, part, act_in, slope, T, 0, T)
        else:
            _channels_stats_par(n, T, x, coef, part, act_in, slope)
    _channels_forward_coef(part, coef, w, b, stat[0], stat[1], stat[2], x.shape[0] // C, use_input_stats, eps)
    if n == 1:
        _channels_apply(x, y, coef, act_in, act_out, slope, T, 0, T)
    else:
        _channels_apply_par(n, T, x, y, coef, act_in, act_out, slope)
    _update_running(stat, 1, *running)


@_jit
def _blocks_backward_run(n, T, dy, x, w, b, mean, rstd, dx, dwb, N, S, K, R, use_input_stats, need_dx, act, after,
                         slope):
    """The blocks family's backward: dx (when ``need_dx``), and dw, db into ``dwb`` ``(2, C)``."""
    C = w.shape[0]
    part = np.zeros((T, 2, C))
    if n == 1:
        _blocks_backward(dy, x, w, b, mean, rstd, dx, part, N, S, K, R, use_input_stats, need_dx, act, after, slope,
                         T, 0, T)
    else:
        _blocks_backward_par(n, T, dy, x, w, b, mean, rstd, dx, part, N, S, K, R, use_input_stats, need_dx, act,
                             after, slope)
    for c in range(C):  # in task order
        tw = 0.0
        tb = 0.0
        for t in range(T):
            tw += part[t, 0, c]
            tb += part[t, 1, c]
        dwb[0, c] = tw
        dwb[1, c] = tb


@_jit
def _channels_backward_run(n, T, dy, x, w, b, mean, rstd, dx, dwb, use_input_stats, need_dx, act, after, slope):
    """The channels family's backward: dx (when ``need_dx``), and dw, db into ``dwb`` ``(2, C)``."""
    C = w.shape[0]
    M = x.shape[0] // C
    act_in = act if after else _NONE
    act_z = _NONE if after else act
    coef = np.empty((7, C), x.dtype)
    part = np.zeros((T, 3, C))
    zl = np.zeros(C)
    early = _channels_backward_coef(mean, rstd, w, b, zl, coef) and use_input_stats and act_z != _NONE
    if early:  # f'(z) needs the rounding of the saved mean first
        if n == 1:
            _channels_centered(x, coef, part, act_in, slope, T, 0, T)
        else:
            _channels_centered_par(n, T, x, coef, part, act_in, slope)
        for c in range(C):
            for t in range(T):
                zl[c] += part[t, 0, c]
            zl[c] /= M
        part[:] = 0
        _channels_backward_coef(mean, rstd, w, b, zl, coef)
    if n == 1:
        _channels_sums(dy, x, coef, part, act_in, act_z, slope, T, 0, T)
    else:
        _channels_sums_par(n, T, dy, x, coef, part, act_in, act_z, slope)
    _channels_backward_merge(part, coef, w, zl, early, M, use_input_stats, dwb[0], dwb[1])
    if need_dx:
        if n == 1:
            _channels_dx(dy, x, dx, coef, act_in, act_z, slope, T, 0, T)
        else:
            _channels_dx_par(n, T, dy, x, dx, coef, act_in, act_z, slope)


# ---- the backend's functions ---------------------------------------------------------------------------------
# Per call, Python does only what the loops cannot: numpy views of the tensors (views, not copies, for the layouts
# the families read), the output tensors, the task count. Small inputs are bound by this, so it is kept lean.

_local = threading.local()
_NP = {torch.float32: np.float32, torch.float64: np.float64}
_started = False


def _start_threads() -> None:
    """Start numba's threading layer once, keeping torch's thread count. Its OpenMP layer binds to the libgomp torch
    loaded and, starting, sets that library's thread count to NUMBA_NUM_THREADS (every core): torch's own count
    would change under the user (two one-thread training processes would each run two threads)."""
    global _started
    if not _started:
        n = torch.get_num_threads()
        numba.np.ufunc.parallel._launch_threads()
        torch.set_num_threads(n)
        _started = True


def _threads(T: int) -> int:
    """How many threads run T tasks: torch's count (numba's pool is set to it; the setting is per Python thread),
    or 1 for a single task."""
    _start_threads()
    n = min(T, torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if n > 1 and getattr(_local, "threads", 0) != n:
        numba.set_num_threads(n)
        _local.threads = n
    return n


def supports(x: torch.Tensor, p: Plan) -> bool:
    """Whether these loops normalize ``x``: a dense float32/float64 CPU tensor with at least one value."""
    return x.is_cpu and x.dtype in _NP and x.layout == torch.strided and x.numel() > 0


def _channels(x: torch.Tensor, p: Plan) -> bool:
    """The channels family: batch statistics with channels innermost in x's memory."""
    return p.pool_batch and (p.R == 1 or is_channels_last(x))


def _memory(t: torch.Tensor, channels: bool) -> np.ndarray:
    """``t`` flat in the family's memory order: ``(N, *S, C)`` for channels, logical ``(N, C, *S)`` for blocks; a
    view when ``t`` is stored that way, else a copy."""
    a = t.numpy(force=True)
    if channels and a.ndim > 2:
        a = np.moveaxis(a, 1, -1)
    return a.reshape(-1)


def _output(x: torch.Tensor, p: Plan, channels: bool, dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialized output like ``x`` and its flat array in the family's memory order: channels_last for
    channels_last batch norm; logical order otherwise (:func:`_restore` turns per-sample results of a channels_last
    input back)."""
    if channels and x.dim() > 2:
        a = np.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype)
        return torch.from_numpy(a).movedim(-1, 1), a.reshape(-1)
    a = np.empty(p.shape, dtype)
    return torch.from_numpy(a), a.reshape(-1)


def _restore(t: torch.Tensor, x: torch.Tensor, p: Plan) -> torch.Tensor:
    """A blocks-family result (logical order) in the output's memory format (a no-op unless that is channels_last)."""
    return t.contiguous(memory_format=torch_ops.output_format(x, p))


_FILLED: dict = {}


def _vector(t: torch.Tensor | None, n: int, dtype) -> np.ndarray:
    """``w`` or ``b`` (or a statistic) as ``n`` contiguous values of ``dtype``: ``t`` broadcast when it holds fewer
    (given per-channel statistics of a per-sample norm). None: ones, an array shared between calls (the loops only
    read it; writable, as a read-only array would be another compiled type)."""
    if t is None:
        if (n, dtype) not in _FILLED:
            _FILLED[n, dtype] = np.ones(n, dtype)
        return _FILLED[n, dtype]
    a = t.numpy(force=True)
    if a.size != n:
        a = np.broadcast_to(a.reshape(1, -1), (n // a.size, a.size))
    if a.ndim != 1:
        a = a.reshape(-1)
    return a if a.dtype == dtype else a.astype(dtype)


def _zeros(t: torch.Tensor | None, n: int, dtype) -> np.ndarray:
    """``b`` as :func:`_vector` makes it; None: zeros."""
    if t is None:
        if (n, dtype, 0) not in _FILLED:
            _FILLED[n, dtype, 0] = np.zeros(n, dtype)
        return _FILLED[n, dtype, 0]
    return _vector(t, n, dtype)


def _tasks(units: int, values: int) -> int:
    """How many tasks ``units`` (statistics or rows) holding ``values`` values are split into: a function of the
    shape only."""
    return max(1, min(units, values // TASK_VALUES))


_NO_BUFFER = {np.float32: np.zeros(0, np.float32), np.float64: np.zeros(0, np.float64)}
_SCRATCH = np.zeros((), np.int64)  # the counter of a layer without one: written, never read


def _running(running: Running | None, x: torch.Tensor, m: int, dtype) -> tuple:
    """The compiled update's arguments: the buffers as arrays when these loops take them (CPU, x's dtype), else
    empty ones (no update there)."""
    if running is None or running.mean.dtype != x.dtype or not running.mean.is_cpu:
        return _NO_BUFFER[dtype], _NO_BUFFER[dtype], m, 0.0, False, _SCRATCH, _SCRATCH
    nbt, skipped = running.num_batches_tracked, running.num_skipped
    return (running.mean.numpy(), running.var.numpy(), m, running.momentum or 0.0, running.momentum is None,
            _SCRATCH if nbt is None else nbt.numpy(), _SCRATCH if skipped is None else skipped.numpy())


def forward(x: torch.Tensor, w, b, call: Call, stats=None, running: Running | None = None):
    """Normalize ``x``; returns ``(y, mean, rstd, var)``. Contract: :func:`normlab.torch_ops.forward`."""
    p = call.plan
    S, G = p.stat_shape
    C = p.affine_size
    dtype = _NP[x.dtype]
    channels = _channels(x, p)
    y, ya = _output(x, p, channels, dtype)
    stat = np.empty((3, S * G), dtype)  # mean, rstd, var
    if stats is not None:
        stat[0], stat[2] = _vector(stats[0], S * G, dtype), _vector(stats[1], S * G, dtype)
    upd = _running(running, x, p.m, dtype)
    args = (_memory(x, channels), _vector(w, C, dtype), _zeros(b, C, dtype), ya, stat)
    act = (CODES[call.activation], call.placement == "after", call.negative_slope)
    if channels:
        T = _tasks(p.N * p.R, p.numel)
        _channels_forward_run(_threads(T), T, *args, call.use_input_stats, call.eps, *act, *upd)
    else:
        T = _tasks(S * G, p.numel)
        _blocks_forward_run(_threads(T), T, *args, p.N, S, p.K, p.R, call.use_input_stats, call.eps, *act,
                            *upd)
        y = _restore(y, x, p)
    mean, rstd, var = map(torch.from_numpy, stat.reshape(3, S, G))  # three tensors: custom ops' outputs may not
    # share a storage
    if running is not None and upd[0].size == 0:
        torch_ops.update_running_stats(running, mean, var, p.m)
    return (y, mean, rstd, var) if call.use_input_stats else (y, stats[0], rstd, stats[1])


def backward(dy: torch.Tensor, x: torch.Tensor, w, b, mean, rstd, call: Call, need_dx: bool = True):
    """``(dx, dw, db)``; dx None unless ``need_dx``, dw/db None when w/b are. Contract:
    :func:`normlab.torch_ops.backward`."""
    p = call.plan
    S, G = p.stat_shape
    C = p.affine_size
    dtype = _NP[x.dtype]
    channels = _channels(x, p)
    dx, dxa = _output(x, p, channels, dtype) if need_dx else (None, _NO_BUFFER[dtype])
    dwb = np.empty((2, C), dtype)
    args = (_memory(dy, channels), _memory(x, channels), _vector(w, C, dtype), _zeros(b, C, dtype),
            _vector(mean, S * G, dtype), _vector(rstd, S * G, dtype), dxa, dwb)
    act = (CODES[call.activation], call.placement == "after", call.negative_slope)
    if channels:
        T = _tasks(p.N * p.R, p.numel)
        _channels_backward_run(_threads(T), T, *args, call.use_input_stats, need_dx, *act)
    else:
        T = _tasks(S * G, p.numel)
        _blocks_backward_run(_threads(T), T, *args, p.N, S, p.K, p.R, call.use_input_stats, need_dx, *act)
        if need_dx:
            dx = _restore(dx, x, p)
    dw, db = map(torch.from_numpy, dwb)  # two storages, as for the statistics
    if w is not None and w.dtype != x.dtype:
        dw = dw.to(w.dtype)
    if b is not None and b.dtype != x.dtype:
        db = db.to(b.dtype)
    return dx, None if w is None else dw, None if b is None else db


# The forward above folds the batch into the running buffers itself; on its own, the update is the torch path's.
update_running_stats = torch_ops.update_running_stats
