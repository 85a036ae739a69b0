r"""Triton kernels for batch, instance and group norm with a fused activation: forward, eval forward, backward.

Every kernel addresses the input as ``(N, C, R)`` through strides ``(s_n, s_c, s_r)`` (NCHW: ``(C*R, R, 1)``;
channels_last: ``(R*C, 1, C)``), with channel ``c`` in group ``g = c // K`` of the :mod:`normlab.spec` view
``(N, G, K, R)``. A statistic ``s`` is ``g`` when pooling over the batch (``POOL_BATCH``, batch norm) or
``n * G + g`` per sample. Work is cut into tiles of ``BLOCK_C`` channels by ``BLOCK_R`` positions; a "row block" is
one tile's worth of positions ``(n, rb)``, ``rb = r // BLOCK_R``. With ``OUT`` = 1 (pooled) or N (per sample), the
math, in the code's names (``f`` the activation ``ACT``, leaky_relu with slope ``SLOPE``; ``a = x``, or ``f(x)``
with ``ACT_FIRST``: the activation comes first and the norm after it, ``placement="after"``)::

    forward   per tile t:    count_t, mean_t, m2_t of a - shift          (exact two-pass in registers; shift = one
                                                                           value of the statistic, read by all)
              per statistic:  mean, m2 = Chan-merge of its tiles in index order; mean += shift, var = m2 / count,
                              rstd = 1 / sqrt(var + eps)
              running:        unless a value is not finite: running = lerp(running, batch, factor), batch the
                              mean and var * m / (m - 1) (averaged over the OUT rows), factor = momentum or
                              1 / num_batches_tracked; else num_skipped += 1
              per element:    xhat = (a - mean) * rstd,  z = xhat * w + b,  y = f(z) (not ACT_FIRST) or z
    backward  per element:    dz = dy * f'(z) (not ACT_FIRST; z recomputed) or dy
              per tile t:     sdz_t = Σ dz,  sdzx_t = Σ dz * xhat        (per channel)
              per channel:    db = Σ_t sdz_t,  dw = Σ_t sdzx_t            (fixed order)
              per statistic:  c1 = Σ_c w * sdz / m,  c2 = Σ_c w * sdzx / m
              per element:    da = rstd * (dz * w - c1 - xhat * c2)       (USE_INPUT_STATS; else rstd * dz * w)
                              dx = da * f'(x) (ACT_FIRST) or da

The per-tile and per-statistic lines of each direction are one launch (_stats_kernel, _grad_stats_kernel): the
last program to finish merges (see _last), so a training step is 4 launches with the element-wise ones
(_apply_kernel, _dx_kernel). All accumulation is float32. Every sum runs in a fixed order over a fixed tiling;
atomics only hand out the tickets that say which program merges, so two runs, and any order in which programs
finish, give bit-identical results. The variance is never ``E[x^2] - E[x]^2``: each tile keeps its exact mean
and sum of squared deviations ``m2``, merged by Chan's formula.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _act(v, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """The activation ``f(v)`` named by ``ACT`` (None: identity), leaky_relu with negative slope ``SLOPE``; the
    Triton twin of normlab.activations."""
    if ACT == "relu":
        out = tl.maximum(v, 0.0)
    elif ACT == "leaky_relu":
        out = tl.where(v > 0, v, SLOPE * v)
    elif ACT == "sigmoid":
        out = tl.sigmoid(v)
    elif ACT == "tanh":
        out = 2.0 * tl.sigmoid(2.0 * v) - 1.0
    elif ACT == "silu":
        out = v * tl.sigmoid(v)
    elif ACT == "gelu":
        out = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    else:
        out = v
    return out


@triton.jit
def _act_grad(v, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """``f'(v)`` at the pre-activation value ``v`` (None: 1)."""
    if ACT == "relu":
        out = tl.where(v > 0, 1.0, 0.0)
    elif ACT == "leaky_relu":
        out = tl.where(v > 0, 1.0, SLOPE)
    elif ACT == "sigmoid":
        s = tl.sigmoid(v)
        out = s * (1.0 - s)
    elif ACT == "tanh":
        t = 2.0 * tl.sigmoid(2.0 * v) - 1.0
        out = 1.0 - t * t
    elif ACT == "silu":
        s = tl.sigmoid(v)
        out = s * (1.0 + v * (1.0 - s))
    elif ACT == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476))
        out = cdf + v * tl.exp(-0.5 * v * v) * 0.3989422804014327
    else:
        out = tl.full(v.shape, 1.0, tl.float32)
    return out


@triton.jit
def _load_affine(w_ptr, b_ptr, idx, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``w`` and ``b`` at ``idx`` in float32; 1 and 0 where the layer has none."""
    if HAS_W:
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.full(idx.shape, 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros(idx.shape, dtype=tl.float32)
    return w, b


@triton.jit
def _row_block(o, blk, lim, nrb, R, BLOCK_R: tl.constexpr):
    """Row block ``blk`` of output row ``o``: its sample ``n``, first position ``r0``, and how many positions from
    ``r0`` on are in range (0 for a block past the row's ``lim`` blocks)."""
    gid = o * lim + blk
    n = gid // nrb
    r0 = (gid % nrb) * BLOCK_R
    return n, r0, tl.where(blk < lim, R - r0, 0)


@triton.jit
def _stat_index(n, c, G, K, POOL_BATCH: tl.constexpr):
    """The statistic channel ``c`` of sample ``n`` belongs to."""
    if POOL_BATCH:
        s = c // K
    else:
        s = n * G + c // K
    return s


@triton.jit
def _shift(x_ptr, n, c, c_mask, K, s_n, s_c, ACT: tl.constexpr, SLOPE: tl.constexpr, ACT_FIRST: tl.constexpr):
    """One value of each channel's statistic, ``a`` at (sample ``n``, first channel of the group, position 0).
    Tiles and the merge work with ``a - shift``: deviations small next to a large mean keep their precision when
    partial means are stored and merged in float32."""
    a = tl.load(x_ptr + n.to(tl.int64) * s_n + (c // K * K) * s_c, mask=c_mask, other=0.0).to(tl.float32)
    if ACT_FIRST:
        a = _act(a, ACT, SLOPE)
    return a


@triton.jit
def _tile_stats(a, mask, nb):
    """Mean and sum of squared deviations ``m2`` along axis 1 of a tile ``a`` (0 outside ``mask``) holding ``nb``
    values per row, by two passes in registers: the second corrects the rounding of the first mean."""
    nb1 = tl.maximum(nb, 1.0)
    mean_0 = tl.sum(a, axis=1) / nb1
    d = tl.where(mask, a - mean_0[:, None], 0.0)
    sd = tl.sum(d, axis=1)
    return mean_0 + sd / nb1, tl.sum(d * d, axis=1) - sd * sd / nb1


@triton.jit
def _chan_merge(count, mean, m2, nb, mean_b, m2_b):
    """``(count, mean, m2)`` after merging a block of ``nb`` values with mean ``mean_b`` and ``m2_b`` into them
    (Chan et al.): no difference of large sums, so no cancellation."""
    total = count + nb
    delta = mean_b - mean
    t1 = tl.maximum(total, 1.0)
    return total, mean + delta * (nb / t1), m2 + m2_b + delta * delta * (count * nb / t1)


@triton.jit
def _last(lock_ptr, arrivals):
    """Whether this program is the last of ``arrivals`` programs to take a ticket from the int32 counter at
    ``lock_ptr``; the last one puts the counter back to 0, so the next launch (or a replayed CUDA graph) needs no
    zeroing. The barrier completes this program's stores before its ticket, and the ticket's acquire-release
    ordering makes every earlier program's stores visible to the last one."""
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr, 1, sem="acq_rel", scope="gpu")
    last = ticket == arrivals - 1
    tl.store(lock_ptr, 0, mask=last)
    return last


@triton.jit
def _merge_tiles(part_ptr, s, s_mask, plane, J, BLOCK_J: tl.constexpr):
    """``(count, mean, m2)`` of each statistic ``s`` from its ``J`` partials ``part[i, s * J + j]`` (i = 0, 1, 2:
    count, mean - shift, m2; ``plane`` apart), merged in index order: blocks of ``BLOCK_J`` partials combined
    exactly, ``m2_b = Σ m2_j + Σ n_j (mean_j - mean_b)^2``, then Chan's formula across blocks. Other programs
    wrote the partials: the loads bypass L1 (``.cg``)."""
    row = part_ptr + s[:, None] * J
    count = tl.zeros(s.shape, dtype=tl.float32)
    mean = tl.zeros(s.shape, dtype=tl.float32)
    m2 = tl.zeros(s.shape, dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        mask = s_mask[:, None] & (j < J)[None, :]
        n_i = tl.load(row + j[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        mu_i = tl.load(row + plane + j[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        m2_i = tl.load(row + 2 * plane + j[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        nb = tl.sum(n_i, axis=1)
        mean_b = tl.sum(n_i * mu_i, axis=1) / tl.maximum(nb, 1.0)
        dev = tl.where(mask, mu_i - mean_b[:, None], 0.0)
        m2_b = tl.sum(m2_i + n_i * dev * dev, axis=1)
        count, mean, m2 = _chan_merge(count, mean, m2, nb, mean_b, m2_b)
    return count, mean, m2


@triton.jit
def _folded(mean_ptr, var_ptr, rm_ptr, c, c_mask, C, OUT, unbias):
    """The batch's statistics of channels ``c`` as the running buffers take them: the mean and the unbiased
    variance ``var * unbias`` (``unbias = m / (m - 1)``), averaged over the ``OUT`` output rows (per-sample
    statistics, ``(OUT, C)``, as torch does), rounded to the buffers' dtype, in float32. Other programs wrote
    them: the loads bypass L1."""
    mean = tl.zeros(c.shape, dtype=tl.float32)
    var = tl.zeros(c.shape, dtype=tl.float32)
    for o in range(OUT):
        mean += tl.load(mean_ptr + o * C + c, mask=c_mask, other=0.0, cache_modifier=".cg")
        var += tl.load(var_ptr + o * C + c, mask=c_mask, other=0.0, cache_modifier=".cg")
    mean = mean / OUT
    var = var / OUT * unbias
    rdt = rm_ptr.dtype.element_ty
    return mean.to(rdt).to(tl.float32), var.to(rdt).to(tl.float32)


@triton.jit
def _finite(v):
    """``v`` is neither infinite nor NaN (float32)."""
    return tl.abs(v) <= 3.4028234663852886e38


@triton.jit
def _lerp(old, new, weight):
    """``old + weight * (new - old)``, in the form torch.lerp picks (``new - (new - old) * (1 - weight)`` for
    ``weight >= 0.5``)."""
    return tl.where(weight < 0.5, old + weight * (new - old), new - (new - old) * (1.0 - weight))


@triton.jit
def _update_running(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, skip_ptr, C, OUT, momentum, unbias,
                    CUMULATIVE: tl.constexpr, HAS_NBT: tl.constexpr, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    """Fold the batch's ``(OUT, C)`` statistics into the ``(C,)`` running buffers, in place, unless one of them
    is not finite (then nothing changes but ``num_skipped``): ``running = lerp(running, batch, factor)``, factor
    ``momentum`` or, ``CUMULATIVE``, ``1 / num_batches_tracked`` after counting this batch. One program."""
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for c0 in range(0, C, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        c_mask = c < C
        mean, var = _folded(mean_ptr, var_ptr, rm_ptr, c, c_mask, C, OUT, unbias)
        bad += (c_mask & ~(_finite(mean) & _finite(var))).to(tl.int32)
    ok = tl.sum(bad, axis=0) == 0
    if HAS_NBT:
        nbt = tl.load(nbt_ptr) + ok.to(tl.int64)
        tl.store(nbt_ptr, nbt)
    if HAS_SKIP:
        tl.store(skip_ptr, tl.load(skip_ptr) + (1 - ok.to(tl.int64)))
    if CUMULATIVE:
        factor = 1.0 / tl.maximum(nbt, 1).to(tl.float32)
    else:
        factor = momentum
    if ok:
        for c0 in range(0, C, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            c_mask = c < C
            mean, var = _folded(mean_ptr, var_ptr, rm_ptr, c, c_mask, C, OUT, unbias)
            old_mean = tl.load(rm_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            old_var = tl.load(rv_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            tl.store(rm_ptr + c, _lerp(old_mean, mean, factor).to(rm_ptr.dtype.element_ty), mask=c_mask)
            tl.store(rv_ptr + c, _lerp(old_var, var, factor).to(rv_ptr.dtype.element_ty), mask=c_mask)


# Integer arguments that change with the batch size (positions of a folded batch, row blocks, tiles, output rows,
# statistics, rows) are do_not_specialize: Triton otherwise keys its compiled variants on each integer being 1 or a
# multiple of 16, and a new batch size (a smaller last batch) would recompile every kernel.
#
# "Last program merges": the reductions below write their partial sums, then take a ticket from an int32 counter
# of their merge unit (_last); the program that takes the last ticket merges the unit's partials in index order,
# so the result does not depend on the order in which programs finish, and resets the counter. A merge unit is
# one column of the grid (BLOCK_C channels: every program holding partials of those channels' statistics) when
# statistics are per channel (K = 1: batch and instance norm), else one output row (a group spans columns).


@triton.jit(do_not_specialize=("R", "nrb", "lim", "T", "OUT", "BPP"))
def _stats_kernel(
    x_ptr,  # input, addressed (n, c, r) -> n * s_n + c * s_c + r * s_r
    part_ptr,  # scratch (3, OUT, C, T) float32: count, mean - shift, m2 of each (output row, channel, tile)
    mean_ptr,  # out (S,) float32, S = OUT * G statistics
    var_ptr,  # out (S,) float32, biased
    rstd_ptr,  # out (S,) float32: 1 / sqrt(var + eps)
    lock_ptr,  # int32 counters, 0 on entry and on exit: one per merge unit, then one for the running update
    rm_ptr,  # (C,) running mean, updated in place (any float dtype); unused without RUNNING
    rv_ptr,  # (C,) running variance (unbiased), updated in place; unused without RUNNING
    nbt_ptr,  # () int64 num_batches_tracked, + 1 per folded batch; unused without HAS_NBT
    skip_ptr,  # () int64 num_skipped, + 1 per batch kept out; unused without HAS_SKIP
    eps,  # added to the variance
    momentum,  # the running update's factor; unused with CUMULATIVE
    unbias,  # m / (m - 1): biased to unbiased variance, m = values per statistic
    C,  # channels
    R,  # positions per sample
    G,  # groups (statistics per output row)
    K,  # channels per group
    s_n, s_c, s_r,  # strides of x
    nrb,  # row blocks per sample: cdiv(R, BLOCK_R)
    lim,  # row blocks per output row: nrb (per sample) or N * nrb (pooled)
    T,  # tiles per output row
    OUT,  # output rows: 1 (pooled) or N (per sample)
    BPP,  # row blocks per tile
    ACT: tl.constexpr,  # activation name, None for none
    SLOPE: tl.constexpr,  # leaky_relu's negative slope
    ACT_FIRST: tl.constexpr,  # the activation comes first, y = norm(f(x)) (placement="after"): statistics of f(x)
    CHANNEL_STATS: tl.constexpr,  # K == 1: a statistic per channel, so a grid column is a merge unit
    RUNNING: tl.constexpr,  # fold the statistics into the running buffers (needs CHANNEL_STATS)
    CUMULATIVE: tl.constexpr,  # momentum None: the factor is 1 / num_batches_tracked (needs HAS_NBT)
    HAS_NBT: tl.constexpr,  # nbt_ptr is given
    HAS_SKIP: tl.constexpr,  # skip_ptr is given
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_R: tl.constexpr,  # positions per row block
    BLOCK_S: tl.constexpr,  # statistics per merge step
    BLOCK_J: tl.constexpr,  # partials combined per merge step
):
    """Statistics of each (output row, group), ``(mean, var, rstd)``, in one launch: every program reduces its
    tile's row blocks to ``(count, mean - shift, m2)`` per channel; the last program of each merge unit merges
    them, and, with ``RUNNING``, the last unit to finish folds them into the running buffers."""
    pid = tl.program_id(0)
    o = pid // T
    t = pid % T
    col = tl.program_id(1)
    c = col * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_R)
    offs = c[:, None] * s_c + r[None, :] * s_r
    shift = _shift(x_ptr, o, c, c_mask, K, s_n, s_c, ACT, SLOPE, ACT_FIRST)  # per sample, output row o is sample o
    count = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(BPP):
        n, r0, valid = _row_block(o, t * BPP + i, lim, nrb, R, BLOCK_R)
        r_mask = r < valid
        mask = c_mask[:, None] & r_mask[None, :]
        base = n.to(tl.int64) * s_n + r0.to(tl.int64) * s_r
        a = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT_FIRST:
            a = _act(a, ACT, SLOPE)
        a = tl.where(mask, a - shift[:, None], 0.0)
        nb = tl.sum(r_mask.to(tl.float32), axis=0)
        mean_b, m2_b = _tile_stats(a, mask, nb)
        count, mean, m2 = _chan_merge(count, mean, m2, nb, mean_b, m2_b)
    plane = OUT * C * T
    p = part_ptr + (o * C + c) * T + t
    tl.store(p, count, mask=c_mask)
    tl.store(p + plane, mean, mask=c_mask)
    tl.store(p + 2 * plane, m2, mask=c_mask)
    cols = tl.num_programs(1)
    if CHANNEL_STATS:  # the unit: this column of output row o, statistics o * G + c (G == C)
        unit = o * cols + col
        arrivals = T
        units = OUT * cols
        lo = o * G + col * BLOCK_C
        hi = tl.minimum(lo + BLOCK_C, o * G + G)
    else:  # the unit: output row o, statistics o * G ... o * G + G - 1
        unit = o
        arrivals = T * cols
        units = OUT
        lo = o * G
        hi = lo + G
    if _last(lock_ptr + unit, arrivals):
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_mask = s < hi
            n_s, mean_s, m2_s = _merge_tiles(part_ptr, s, s_mask, plane, K * T, BLOCK_J)
            var_s = tl.maximum(m2_s, 0.0) / tl.maximum(n_s, 1.0)  # m2 < 0: rounding
            mean_s += _shift(x_ptr, o, (s % G) * K, s_mask, K, s_n, s_c, ACT, SLOPE, ACT_FIRST)
            tl.store(mean_ptr + s, mean_s, mask=s_mask)
            tl.store(var_ptr + s, var_s, mask=s_mask)
            tl.store(rstd_ptr + s, 1.0 / tl.sqrt(var_s + eps), mask=s_mask)
        if RUNNING:
            if _last(lock_ptr + units, units):
                _update_running(mean_ptr, var_ptr, rm_ptr, rv_ptr, nbt_ptr, skip_ptr, C, OUT, momentum, unbias,
                                CUMULATIVE, HAS_NBT, HAS_SKIP, BLOCK_S)  # fmt: skip


@triton.jit
def _elementwise_tile(C, R, G, K, s_n, s_c, s_r, nrb, POOL_BATCH: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    """This program's tile of an element-wise kernel (grid ``(N * nrb, cdiv(C, BLOCK_C))``): its channels ``c``
    and their mask, their statistic ``s``, the element offsets ``offs``, the element mask, and ``first``: the tile
    starts at position 0 of its statistics' first sample (sample 0 when pooled, else its own), so that the tile
    holding a statistic's first value (``first`` and the group's first channel) is one program's."""
    n, r0, valid = _row_block(0, tl.program_id(0), tl.num_programs(0), nrb, R, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_R)
    offs = n.to(tl.int64) * s_n + r0.to(tl.int64) * s_r + c[:, None] * s_c + r[None, :] * s_r
    first = r0 == 0
    if POOL_BATCH:
        first = first & (n == 0)
    return c, c_mask, _stat_index(n, c, G, K, POOL_BATCH), offs, c_mask[:, None] & (r < valid)[None, :], first


@triton.jit(do_not_specialize=("R", "nrb"))
def _apply_kernel(
    x_ptr,  # input, addressed as in _stats_kernel
    y_ptr,  # out, same strides as x
    w_ptr,  # (C,) weight, any float dtype; unused without HAS_W
    b_ptr,  # (C,) bias; unused without HAS_B
    mean_ptr,  # (S,) statistics: mean (float32 from _stats_kernel; given: any float dtype) ...
    var_ptr,  # ... and biased variance, given (unused with USE_INPUT_STATS)
    rstd_ptr,  # (S,) float32 1 / sqrt(var + eps): in from _stats_kernel (USE_INPUT_STATS), else out
    eps,  # added to the variance
    C, R, G, K,  # channels, positions per sample, groups, channels per group
    s_n, s_c, s_r,  # strides of x and y
    nrb,  # row blocks per sample
    ACT: tl.constexpr,  # activation name, None for none
    SLOPE: tl.constexpr,  # leaky_relu's negative slope
    ACT_FIRST: tl.constexpr,  # the activation comes first, y = norm(f(x)) (placement="after"); else y = f(norm(x))
    POOL_BATCH: tl.constexpr,  # statistics pooled over the batch instead of per sample
    HAS_W: tl.constexpr,  # w is given
    HAS_B: tl.constexpr,  # b is given
    USE_INPUT_STATS: tl.constexpr,  # the input's own statistics, with their rstd; else given ones (eval)
    SHARED_STATS: tl.constexpr,  # the given statistics hold one value per group, for every sample (G of them)
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_R: tl.constexpr,  # positions per tile
):
    """``y = f((a - mean) * rstd * w + b)`` (or ``f`` first, ``ACT_FIRST``) over one tile; with given statistics
    ``rstd = 1 / sqrt(var + eps)`` is computed here and stored by the program holding each statistic's first
    value."""
    c, c_mask, s, offs, mask, first = _elementwise_tile(C, R, G, K, s_n, s_c, s_r, nrb, POOL_BATCH, BLOCK_C,
                                                        BLOCK_R)  # fmt: skip
    if USE_INPUT_STATS:
        mean = tl.load(mean_ptr + s, mask=c_mask, other=0.0)
        rstd = tl.load(rstd_ptr + s, mask=c_mask, other=0.0)
    else:
        given = s
        if SHARED_STATS:
            given = c // K
        mean = tl.load(mean_ptr + given, mask=c_mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.load(var_ptr + given, mask=c_mask, other=1.0).to(tl.float32) + eps)
        if first:  # one writer per statistic: the tile of its first value, at the group's first channel
            tl.store(rstd_ptr + s, rstd, mask=c_mask & (c % K == 0))
    w, b = _load_affine(w_ptr, b_ptr, c, c_mask, HAS_W, HAS_B)
    scale = rstd * w
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT_FIRST:
        a = _act(a, ACT, SLOPE)
    z = (a - mean[:, None]) * scale[:, None] + b[:, None]
    if not ACT_FIRST:
        z = _act(z, ACT, SLOPE)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stat_coefs(q_ptr, w_ptr, coef_ptr, s, s_mask, S, G, K, inv_m, HAS_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """``c1 = Σ_k w q1 / m`` and ``c2 = Σ_k w q2 / m`` of statistics ``s`` from the ``(2, S, K)`` per-channel sums
    ``q`` (written by other programs: the loads bypass L1), into ``coef`` ``(2, S)``."""
    c1 = tl.zeros(s.shape, dtype=tl.float32)
    c2 = tl.zeros(s.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = s_mask[:, None] & (k < K)[None, :]
        w = tl.full([s.shape[0], BLOCK_K], 1.0, tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + (s % G)[:, None] * K + k[None, :], mask=mask, other=0.0).to(tl.float32)
        q = q_ptr + s[:, None] * K + k[None, :]
        c1 += tl.sum(w * tl.load(q, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
        c2 += tl.sum(w * tl.load(q + S * K, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
    tl.store(coef_ptr + s, c1 * inv_m, mask=s_mask)
    tl.store(coef_ptr + S + s, c2 * inv_m, mask=s_mask)


@triton.jit(do_not_specialize=("R", "nrb", "lim", "T", "OUT", "BPP"))
def _grad_stats_kernel(
    dy_ptr,  # gradient of y, same strides as x
    x_ptr,  # input
    w_ptr,  # (C,) weight; unused without HAS_W
    b_ptr,  # (C,) bias; unused without HAS_B
    mean_ptr,  # (S,) float32 statistics used by the forward
    rstd_ptr,  # (S,) float32
    part_ptr,  # scratch (2, OUT, C, T) float32: Σ dz and Σ dz * xhat of each (output row, channel, tile)
    q_ptr,  # scratch (2, OUT, C) float32: the same per (output row, channel); used with COEF, not CHANNEL_STATS
    dw_ptr,  # out (C,) in w's dtype: Σ dz * xhat; unused without HAS_W
    db_ptr,  # out (C,) in b's dtype: Σ dz; unused without HAS_B
    coef_ptr,  # out (2, S) float32: c1 = Σ w * dz / m and c2 = Σ w * dz * xhat / m per statistic; with COEF
    lock_ptr,  # int32 counters, 0 on entry and on exit: one per grid column, then one for the statistics
    inv_m,  # 1 / m, m = values per statistic
    C, R, G, K,  # channels, positions per sample, groups, channels per group
    s_n, s_c, s_r,  # strides of x and dy
    nrb, lim, T, OUT, BPP,  # as in _stats_kernel
    ACT: tl.constexpr,  # as in _apply_kernel
    SLOPE: tl.constexpr,
    ACT_FIRST: tl.constexpr,
    POOL_BATCH: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    CHANNEL_STATS: tl.constexpr,  # K == 1: a statistic per channel, so a column's merge gives its c1, c2
    COEF: tl.constexpr,  # compute c1, c2 (the input's own statistics, and dx is wanted)
    BLOCK_C: tl.constexpr,  # channels per tile
    BLOCK_R: tl.constexpr,  # positions per row block
    BLOCK_T: tl.constexpr,  # tiles summed per merge step
    BLOCK_S: tl.constexpr,  # statistics per step of the c1, c2 merge
    BLOCK_K: tl.constexpr,  # channels summed per step of the c1, c2 merge
):
    """dw, db and the dx coefficients c1, c2 in one launch: every program sums ``dz`` and ``dz * xhat`` over its
    tile's row blocks; the last program of each grid column sums its channels' tiles in index order, per output
    row (``q``), then over output rows (dw, db); c1, c2 come from ``q`` in that same program when statistics are
    per channel, else in the last column to finish (a group spans columns)."""
    pid = tl.program_id(0)
    o = pid // T
    t = pid % T
    col = tl.program_id(1)
    c = col * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    r = tl.arange(0, BLOCK_R)
    offs = c[:, None] * s_c + r[None, :] * s_r
    s = _stat_index(o, c, G, K, POOL_BATCH)  # per sample, output row o is sample o
    mean = tl.load(mean_ptr + s, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + s, mask=c_mask, other=0.0)
    w, b = _load_affine(w_ptr, b_ptr, c, c_mask, HAS_W, HAS_B)
    sdz = tl.zeros([BLOCK_C], dtype=tl.float32)
    sdzx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(BPP):
        n, r0, valid = _row_block(o, t * BPP + i, lim, nrb, R, BLOCK_R)
        mask = c_mask[:, None] & (r < valid)[None, :]
        base = n.to(tl.int64) * s_n + r0.to(tl.int64) * s_r
        a = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dz = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT_FIRST:
            a = _act(a, ACT, SLOPE)
        xhat = (a - mean[:, None]) * rstd[:, None]
        if not ACT_FIRST:
            dz = dz * _act_grad(xhat * w[:, None] + b[:, None], ACT, SLOPE)
        xhat = tl.where(mask, xhat, 0.0)
        sdz += tl.sum(dz, axis=1)
        sdzx += tl.sum(dz * xhat, axis=1)
    plane = OUT * C * T
    p = part_ptr + (o * C + c) * T + t
    tl.store(p, sdz, mask=c_mask)
    tl.store(p + plane, sdzx, mask=c_mask)
    cols = tl.num_programs(1)
    if _last(lock_ptr + col, OUT * T):
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        for u in range(OUT):  # output row u
            q1 = tl.zeros([BLOCK_C], dtype=tl.float32)
            q2 = tl.zeros([BLOCK_C], dtype=tl.float32)
            row = part_ptr + (u * C + c[:, None]) * T
            for t0 in range(0, T, BLOCK_T):
                tt = t0 + tl.arange(0, BLOCK_T)
                t_mask = c_mask[:, None] & (tt < T)[None, :]
                q1 += tl.sum(tl.load(row + tt[None, :], mask=t_mask, other=0.0, cache_modifier=".cg"), axis=1)
                q2 += tl.sum(tl.load(row + plane + tt[None, :], mask=t_mask, other=0.0, cache_modifier=".cg"), axis=1)
            if COEF:
                if CHANNEL_STATS:  # statistic u * C + c: its c1, c2 are this channel's alone
                    tl.store(coef_ptr + u * C + c, (w * q1) * inv_m, mask=c_mask)
                    tl.store(coef_ptr + OUT * C + u * C + c, (w * q2) * inv_m, mask=c_mask)
                else:
                    tl.store(q_ptr + u * C + c, q1, mask=c_mask)
                    tl.store(q_ptr + OUT * C + u * C + c, q2, mask=c_mask)
            db += q1
            dw += q2
        if HAS_W:
            tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=c_mask)
        if HAS_B:
            tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=c_mask)
        if COEF and not CHANNEL_STATS:
            if _last(lock_ptr + cols, cols):
                for s0 in range(0, OUT * G, BLOCK_S):
                    ss = s0 + tl.arange(0, BLOCK_S)
                    _stat_coefs(q_ptr, w_ptr, coef_ptr, ss, ss < OUT * G, OUT * G, G, K, inv_m, HAS_W, BLOCK_K)


@triton.jit(do_not_specialize=("S", "R", "nrb"))
def _dx_kernel(
    dy_ptr,  # gradient of y, same strides as x
    x_ptr,  # input
    dx_ptr,  # out, same strides as x
    w_ptr,  # (C,) weight; unused without HAS_W
    b_ptr,  # (C,) bias; unused without HAS_B
    mean_ptr,  # (S,) float32
    rstd_ptr,  # (S,) float32
    c_ptr,  # (2, S) float32 c1, c2 from _grad_stats_kernel; unused without USE_INPUT_STATS
    S,  # statistics
    C, R, G, K,
    s_n, s_c, s_r,
    nrb,
    ACT: tl.constexpr,  # as in _apply_kernel
    SLOPE: tl.constexpr,
    ACT_FIRST: tl.constexpr,
    POOL_BATCH: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    USE_INPUT_STATS: tl.constexpr,  # the statistics were the input's own and carry gradient
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    c, c_mask, s, offs, mask, _ = _elementwise_tile(C, R, G, K, s_n, s_c, s_r, nrb, POOL_BATCH, BLOCK_C, BLOCK_R)
    mean = tl.load(mean_ptr + s, mask=c_mask, other=0.0)
    rstd = tl.load(rstd_ptr + s, mask=c_mask, other=0.0)
    w, b = _load_affine(w_ptr, b_ptr, c, c_mask, HAS_W, HAS_B)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = x
    if ACT_FIRST:
        a = _act(x, ACT, SLOPE)
    xhat = (a - mean[:, None]) * rstd[:, None]
    if not ACT_FIRST:
        dz = dz * _act_grad(xhat * w[:, None] + b[:, None], ACT, SLOPE)
    if USE_INPUT_STATS:
        c1 = tl.load(c_ptr + s, mask=c_mask, other=0.0)
        c2 = tl.load(c_ptr + S + s, mask=c_mask, other=0.0)
        da = (dz * w[:, None] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    else:
        da = dz * (w * rstd)[:, None]
    if ACT_FIRST:
        da = da * _act_grad(x, ACT, SLOPE)
    tl.store(dx_ptr + offs, da.to(dx_ptr.dtype.element_ty), mask=mask)


# Row path: statistics along contiguous rows (layer norm; any per-sample plan with G = 1 and R = 1). The input is
# an (N, K) matrix with K contiguous; one statistic per row, w and b have K entries. A tile is BLOCK_N rows by
# BLOCK_K columns. With SINGLE (K <= BLOCK_K) a row block is loaded once and stays in registers from its
# statistics to its output; otherwise each row block loops over chunks of BLOCK_K columns, twice.
#
#     forward   per row:      mean, var of a (two-pass in registers; chunks: Chan-merge around shift = a[n, 0]),
#                             rstd = 1 / sqrt(var + eps)
#               per element:  xhat = (a - mean) * rstd,  z = xhat * w + b,  y = f(z) (not ACT_FIRST) or z
#     backward  per element:  dz = dy * f'(z) (not ACT_FIRST) or dy,  g = dz * w
#               per row:      c1 = Σ_k g / K,  c2 = Σ_k g * xhat / K
#               per element:  dx = rstd * (g - c1 - xhat * c2) (USE_INPUT_STATS; else rstd * g), * f'(x) (ACT_FIRST)
#               per column:   dw = Σ_n dz * xhat,  db = Σ_n dz: per program over its rows, then summed over the
#                             programs in index order by _layer_grad_merge_kernel (no atomics)


@triton.jit(do_not_specialize=("N",))
def _layer_fwd_kernel(
    x_ptr,  # input (N, K), rows contiguous
    y_ptr,  # out (N, K), same layout
    w_ptr,  # (K,) weight, any float dtype; unused without HAS_W
    b_ptr,  # (K,) bias; unused without HAS_B
    mean_ptr,  # (N,) float32: out with USE_INPUT_STATS, else in
    var_ptr,  # (N,) float32 biased variance: out with USE_INPUT_STATS, else in
    rstd_ptr,  # out (N,) float32: 1 / sqrt(var + eps)
    eps,  # added to the variance
    N,  # rows (statistics)
    K,  # row length (values per statistic)
    ACT: tl.constexpr,  # activation name, None for none
    SLOPE: tl.constexpr,  # leaky_relu's negative slope
    ACT_FIRST: tl.constexpr,  # the activation comes first, y = norm(f(x)) (placement="after"); else y = f(norm(x))
    HAS_W: tl.constexpr,  # w is given
    HAS_B: tl.constexpr,  # b is given
    USE_INPUT_STATS: tl.constexpr,  # normalize with the rows' own statistics, else with mean_ptr, var_ptr (eval)
    SINGLE: tl.constexpr,  # K <= BLOCK_K: one tile holds whole rows
    BLOCK_N: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # columns per tile
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows < N
    row0 = rows.to(tl.int64) * K
    base = row0[:, None]
    k = tl.arange(0, BLOCK_K)
    if not USE_INPUT_STATS:
        mean = tl.load(mean_ptr + rows, mask=n_mask, other=0.0)
        var = tl.load(var_ptr + rows, mask=n_mask, other=1.0)
    if SINGLE:
        mask = n_mask[:, None] & (k < K)[None, :]
        a = tl.load(x_ptr + base + k[None, :], mask=mask, other=0.0).to(tl.float32)
        if ACT_FIRST:
            a = _act(a, ACT, SLOPE)
        if USE_INPUT_STATS:
            a = tl.where(mask, a, 0.0)
            mean_0 = tl.sum(a, axis=1) / K  # first pass; the second corrects its rounding
            d = tl.where(mask, a - mean_0[:, None], 0.0)
            sd = tl.sum(d, axis=1)
            mean = mean_0 + sd / K
            var = tl.maximum(tl.sum(d * d, axis=1) - sd * sd / K, 0.0) / K
        rstd = 1.0 / tl.sqrt(var + eps)
        w, b = _load_affine(w_ptr, b_ptr, k, k < K, HAS_W, HAS_B)
        z = (a - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
        if not ACT_FIRST:
            z = _act(z, ACT, SLOPE)
        tl.store(y_ptr + base + k[None, :], z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if USE_INPUT_STATS:
            shift = tl.load(x_ptr + row0, mask=n_mask, other=0.0).to(tl.float32)
            if ACT_FIRST:
                shift = _act(shift, ACT, SLOPE)
            count = tl.zeros([BLOCK_N], dtype=tl.float32)
            mean = tl.zeros([BLOCK_N], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + k
                mask = n_mask[:, None] & (kk < K)[None, :]
                a = tl.load(x_ptr + base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                if ACT_FIRST:
                    a = _act(a, ACT, SLOPE)
                a = tl.where(mask, a - shift[:, None], 0.0)
                nb = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
                mean_b, m2_b = _tile_stats(a, mask, nb)
                count, mean, m2 = _chan_merge(count, mean, m2, nb, mean_b, m2_b)
            mean = shift + mean
            var = tl.maximum(m2, 0.0) / K
        rstd = 1.0 / tl.sqrt(var + eps)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            k_mask = kk < K
            mask = n_mask[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
            if ACT_FIRST:
                a = _act(a, ACT, SLOPE)
            z = (a - mean[:, None]) * rstd[:, None]
            if HAS_W:
                z = z * tl.load(w_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                z = z + tl.load(b_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if not ACT_FIRST:
                z = _act(z, ACT, SLOPE)
            tl.store(y_ptr + base + kk[None, :], z.to(y_ptr.dtype.element_ty), mask=mask)
    if USE_INPUT_STATS:
        tl.store(mean_ptr + rows, mean, mask=n_mask)
        tl.store(var_ptr + rows, var, mask=n_mask)
    tl.store(rstd_ptr + rows, rstd, mask=n_mask)


@triton.jit
def _layer_dz(x, dy, mean, rstd, w, b, mask, ACT: tl.constexpr, SLOPE: tl.constexpr, ACT_FIRST: tl.constexpr):
    """``(xhat, dz)`` of a (rows, columns) tile, both 0 outside ``mask``; ``dz = dy * f'(z)`` with ``z = xhat * w + b``
    recomputed (not ``ACT_FIRST``), else ``dy``."""
    a = x
    if ACT_FIRST:
        a = _act(x, ACT, SLOPE)
    xhat = tl.where(mask, (a - mean[:, None]) * rstd[:, None], 0.0)
    dz = dy
    if not ACT_FIRST:
        dz = dy * _act_grad(xhat * w[None, :] + b[None, :], ACT, SLOPE)
    return xhat, tl.where(mask, dz, 0.0)


@triton.jit(do_not_specialize=("N", "BPP"))
def _layer_bwd_kernel(
    dy_ptr,  # gradient of y, (N, K) rows contiguous
    x_ptr,  # input, same layout
    dx_ptr,  # out, same layout; unused without NEED_DX
    w_ptr,  # (K,) weight; unused without HAS_W
    b_ptr,  # (K,) bias; unused without HAS_B
    mean_ptr,  # (N,) float32 statistics used by the forward
    rstd_ptr,  # (N,) float32
    part_ptr,  # out (2, P, K) float32: Σ dz * xhat and Σ dz over each program's rows (written, not added to)
    N,  # rows
    K,  # row length
    BPP,  # row blocks (of BLOCK_N rows) per program; program p owns blocks p * BPP ... p * BPP + BPP - 1
    ACT: tl.constexpr,  # activation name, None for none
    SLOPE: tl.constexpr,  # leaky_relu's negative slope
    ACT_FIRST: tl.constexpr,  # the activation comes first, y = norm(f(x)) (placement="after")
    HAS_W: tl.constexpr,  # w is given
    HAS_B: tl.constexpr,  # b is given
    USE_INPUT_STATS: tl.constexpr,  # the statistics were the rows' own and carry gradient
    NEED_DX: tl.constexpr,  # compute dx (else only the partials of dw and db)
    SINGLE: tl.constexpr,  # K <= BLOCK_K: one tile holds whole rows
    BLOCK_N: tl.constexpr,  # rows per row block
    BLOCK_K: tl.constexpr,  # columns per tile
):
    pid = tl.program_id(0)
    plane = tl.num_programs(0) * K
    k = tl.arange(0, BLOCK_K)
    if SINGLE:
        k_mask = k < K
        w, b = _load_affine(w_ptr, b_ptr, k, k_mask, HAS_W, HAS_B)
        dw = tl.zeros([BLOCK_K], dtype=tl.float32)
        db = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in range(BPP):
            rows = (pid * BPP + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = rows < N
            mask = n_mask[:, None] & k_mask[None, :]
            offs = rows.to(tl.int64)[:, None] * K + k[None, :]
            mean = tl.load(mean_ptr + rows, mask=n_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=n_mask, other=0.0)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xhat, dz = _layer_dz(x, dy, mean, rstd, w, b, mask, ACT, SLOPE, ACT_FIRST)
            db += tl.sum(dz, axis=0)
            dw += tl.sum(dz * xhat, axis=0)
            if NEED_DX:
                g = dz * w[None, :]
                if USE_INPUT_STATS:
                    c1 = tl.sum(g, axis=1) / K
                    c2 = tl.sum(g * xhat, axis=1) / K
                    da = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                else:
                    da = g * rstd[:, None]
                if ACT_FIRST:
                    da = da * _act_grad(x, ACT, SLOPE)
                tl.store(dx_ptr + offs, da.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(part_ptr + pid * K + k, dw, mask=k_mask)
        tl.store(part_ptr + plane + pid * K + k, db, mask=k_mask)
    else:
        for i in range(BPP):
            rows = (pid * BPP + i) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = rows < N
            base = rows.to(tl.int64)[:, None] * K
            mean = tl.load(mean_ptr + rows, mask=n_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=n_mask, other=0.0)
            c1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_N], dtype=tl.float32)
            if USE_INPUT_STATS and NEED_DX:  # first sweep: the row sums c1, c2
                for k0 in range(0, K, BLOCK_K):
                    kk = k0 + k
                    k_mask = kk < K
                    mask = n_mask[:, None] & k_mask[None, :]
                    w, b = _load_affine(w_ptr, b_ptr, kk, k_mask, HAS_W, HAS_B)
                    x = tl.load(x_ptr + base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                    dy = tl.load(dy_ptr + base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                    xhat, dz = _layer_dz(x, dy, mean, rstd, w, b, mask, ACT, SLOPE, ACT_FIRST)
                    g = dz * w[None, :]
                    c1 += tl.sum(g, axis=1)
                    c2 += tl.sum(g * xhat, axis=1)
                c1 = c1 / K
                c2 = c2 / K
            for k0 in range(0, K, BLOCK_K):  # second sweep: dx, and this program's dw, db
                kk = k0 + k
                k_mask = kk < K
                mask = n_mask[:, None] & k_mask[None, :]
                w, b = _load_affine(w_ptr, b_ptr, kk, k_mask, HAS_W, HAS_B)
                x = tl.load(x_ptr + base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + base + kk[None, :], mask=mask, other=0.0).to(tl.float32)
                xhat, dz = _layer_dz(x, dy, mean, rstd, w, b, mask, ACT, SLOPE, ACT_FIRST)
                if NEED_DX:
                    g = dz * w[None, :]
                    da = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
                    if ACT_FIRST:
                        da = da * _act_grad(x, ACT, SLOPE)
                    tl.store(dx_ptr + base + kk[None, :], da.to(dx_ptr.dtype.element_ty), mask=mask)
                p_dw = part_ptr + pid * K + kk  # this program's own row of the partials: no other program writes it
                acc = k_mask & (i > 0)  # the first row block writes the row, the next ones add to it: no zeroing
                tl.store(p_dw, tl.load(p_dw, mask=acc, other=0.0) + tl.sum(dz * xhat, axis=0), mask=k_mask)
                p_db = p_dw + plane
                tl.store(p_db, tl.load(p_db, mask=acc, other=0.0) + tl.sum(dz, axis=0), mask=k_mask)


@triton.jit(do_not_specialize=("P",))
def _layer_grad_merge_kernel(
    part_ptr,  # (2, P, K) float32 from _layer_bwd_kernel
    dw_ptr,  # out (K,) in w's dtype; unused without HAS_W
    db_ptr,  # out (K,) in b's dtype; unused without HAS_B
    P,  # programs of _layer_bwd_kernel
    K,  # row length
    HAS_W: tl.constexpr,  # w is given
    HAS_B: tl.constexpr,  # b is given
    BLOCK_K: tl.constexpr,  # columns per program
    BLOCK_P: tl.constexpr,  # partial rows summed per step
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    dw = tl.zeros([BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_K], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & k_mask[None, :]
        offs = p[:, None] * K + k[None, :]
        dw += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0)
        db += tl.sum(tl.load(part_ptr + P * K + offs, mask=mask, other=0.0), axis=0)
    if HAS_W:
        tl.store(dw_ptr + k, dw.to(dw_ptr.dtype.element_ty), mask=k_mask)
    if HAS_B:
        tl.store(db_ptr + k, db.to(db_ptr.dtype.element_ty), mask=k_mask)
