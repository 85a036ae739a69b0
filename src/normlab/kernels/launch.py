"""Launchers: tensors in, tensors out. Pick tiles and grids, allocate outputs, run the kernels of :mod:`.norm`.

The launchers are plain functions: :mod:`normlab.functional` wraps whichever backend runs in its own
``torch.library`` ops (``normlab::norm_forward``, ``normlab::norm_backward``), which is what ``torch.compile`` sees.

The input is addressed as ``(N, C, R)`` with strides ``(s_n, s_c, s_r)``: NCHW-like contiguous ``(C*R, R, 1)`` or
channels_last ``(R*C, 1, C)``. Other layouts are copied to contiguous first. When statistics pool over the batch
and rows of different samples are evenly strided (channels_last, or ``R == 1``), the batch is folded into the
positions (``N = 1``, ``R = N * R``), so ``(N, C)`` and NHWC inputs are one long strided matrix.

Plans whose statistics run along contiguous rows (per sample, ``G = 1``, ``R = 1``: layer norm, and group norm
of an ``(N, C)`` input with one group) take the row path instead (:func:`layer_fwd`, :func:`layer_bwd`): x as an
``(N, K)`` matrix, one statistic per row, whole rows in registers when ``K`` fits.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from normlab.kernels import norm
from normlab.spec import LEAKY_SLOPE, Running
from normlab.torch_ops import is_channels_last


@dataclass(frozen=True)
class Tuning:
    """Tile sizes; None picks them from the shape. Tests shrink them to exercise many tiles on tiny inputs. Frozen:
    it keys the cache of launch plans, so a change is a new ``TUNING``."""

    tile: int = 4096  # elements per (BLOCK_C, BLOCK_R) tile
    block_c: Optional[int] = None
    block_r: Optional[int] = None
    programs: Optional[int] = None  # target number of reduction programs; None: 4 per SM on CUDA, 8 elsewhere
    merge_block: int = 64  # BLOCK_S / BLOCK_J / BLOCK_T / BLOCK_K of the merge kernels
    row_max: int = 8192  # row path: longest row (elements, padded to a power of 2) held whole in registers
    row_chunk: int = 4096  # row path: columns per step along a longer row
    row_block_n: Optional[int] = None  # row path: rows per tile; None: tile // BLOCK_K (at least 1)


TUNING = Tuning()


@dataclass(frozen=True)
class Activation:
    """The fused activation as the kernels take it (constexprs: one compiled variant per value)."""

    name: Optional[str] = None  # a name in normlab.spec.ACTIVATIONS, or None for none
    slope: float = LEAKY_SLOPE  # leaky_relu's negative slope
    act_first: bool = False  # the activation comes first, y = norm(f(x)) (placement="after"); else y = f(norm(x))

    @functools.cached_property
    def args(self) -> dict:
        """The kernels' ``ACT``, ``SLOPE`` and ``ACT_FIRST`` (built once per activation)."""
        return {"ACT": self.name, "SLOPE": float(self.slope), "ACT_FIRST": self.act_first and self.name is not None}


NO_ACTIVATION = Activation()


@functools.lru_cache(maxsize=256)
def activation_of(name: Optional[str], slope: float, act_first: bool) -> Activation:
    """The :class:`Activation` of these arguments, built once (a training loop meets a handful)."""
    return Activation(name, slope, act_first)


def device_guard(device: torch.device):
    """A context making ``device`` CUDA's current device (a no-op for other devices): Triton launches on the current
    device, so a tensor on cuda:1 while cuda:0 is current would fault."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_device_of(arg: int):
    """Run the decorated launcher under :func:`device_guard` of its positional argument ``arg`` (its x)."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with device_guard(args[arg].device):
                return fn(*args, **kwargs)

        return run

    return wrap


@dataclass(frozen=True)
class _Geometry:
    N: int  # samples (1 when folded into R)
    C: int  # channels = G * K
    R: int  # positions per sample
    G: int
    K: int
    s_n: int
    s_c: int
    s_r: int
    pool_batch: bool  # one statistic per group over the whole batch, else per sample
    m: int  # values per statistic

    @functools.cached_property
    def out(self) -> int:
        """Output rows of the reductions: one per sample, or one for the whole batch."""
        return 1 if self.pool_batch else self.N

    @functools.cached_property
    def S(self) -> int:
        """Number of statistics."""
        return self.out * self.G


def _geometry(shape: tuple[int, ...], G: int, K: int, pool_batch: bool, channels_last: bool) -> _Geometry:
    N, C = shape[0], shape[1]
    R = math.prod(shape[2:]) if N * C else 0
    s_n, s_c, s_r = (R * C, 1, C) if channels_last else (C * R, R, 1)
    m = K * R * (N if pool_batch else 1)
    if pool_batch and (R == 1 or s_n == R * s_r):
        s_r = s_r if R > 1 else s_n
        N, R, s_n = 1, N * R, 0
    return _Geometry(N, C, R, G, K, s_n, s_c, s_r, pool_batch, m)


# Plain integer math: triton.cdiv and triton.next_power_of_2 cost microseconds a call on the host.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(v: int) -> int:
    """The least power of 2 >= v (1 for v <= 1)."""
    return 1 << max(int(v) - 1, 0).bit_length()


def _blocks(g: _Geometry, t: Tuning) -> tuple[int, int, int]:
    """``(BLOCK_C, BLOCK_R, num_warps)``: a tile of about ``t.tile`` elements along the contiguous axis."""
    if g.s_c == 1:  # channels contiguous: wide in C, a few rows
        block_c = t.block_c or min(_pow2(g.C), 128)
        block_r = t.block_r or max(1, min(_pow2(g.R), t.tile // block_c))
    else:  # positions contiguous: whole runs of R when short, several channels per tile
        if t.block_r:
            block_r = t.block_r
        elif g.R <= 1024:
            block_r = _pow2(g.R)
        else:  # least padding, ties to the larger block
            block_r = min((256, 512, 1024), key=lambda b: (_cdiv(g.R, b) * b, -b))
        block_c = t.block_c or max(1, min(_pow2(g.C), t.tile // block_r))
    return block_c, block_r, (8 if block_c * block_r >= 4096 else 4)


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, asked once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _target_programs(device: torch.device, t: Tuning) -> int:
    """How many programs a reduction should spread over: ``t.programs``, else 4 per SM on CUDA, 8 elsewhere."""
    if t.programs is not None:
        return t.programs
    if device.type != "cuda":
        return 8
    return 4 * _sm_count(device if device.index is not None else torch.device("cuda", torch.cuda.current_device()))


def _split(g: _Geometry, block_c: int, block_r: int, target: int) -> tuple[int, int, int, int]:
    """Row blocks of the reductions: ``(nrb, lim, T, BPP)``, so that ``OUT * T * cdiv(C, BLOCK_C)`` programs of
    ``BPP`` row blocks each keep every SM busy even when C is small."""
    nrb = _cdiv(g.R, block_r)
    lim = g.N * nrb if g.pool_batch else nrb
    per_row = max(1, target // (g.out * _cdiv(g.C, block_c)))
    bpp = _cdiv(lim, min(lim, per_row))
    return nrb, lim, _cdiv(lim, bpp), bpp


@dataclass(frozen=True)
class _Plan:
    """How the ``(N, C, R)`` kernels run over one geometry: tiles, row blocks, grids."""

    g: _Geometry
    block_c: int
    block_r: int
    warps: int
    nrb: int  # row blocks per sample
    lim: int  # row blocks per output row of the reductions
    T: int  # tiles per output row
    bpp: int  # row blocks per tile
    grid_c: int  # cdiv(C, BLOCK_C): the grids' second dimension

    @functools.cached_property
    def counters(self) -> int:
        """Ticket counters the reductions use: one per merge unit (grid column, or output row when a group spans
        columns) and one more for the second-level merge."""
        return max(self.g.out, 1) * self.grid_c + 1

    @functools.cached_property
    def fwd(self) -> dict:
        """The launch options of the tile kernels (built once per plan)."""
        return {"BLOCK_C": self.block_c, "BLOCK_R": self.block_r, "num_warps": self.warps}


@functools.lru_cache(maxsize=1024)
def _cached_plan(shape, G, K, pool_batch, channels_last, device, t: Tuning) -> _Plan:
    g = _geometry(shape, G, K, pool_batch, channels_last)
    block_c, block_r, warps = _blocks(g, t)
    nrb, lim, T, bpp = _split(g, block_c, block_r, _target_programs(device, t))
    return _Plan(g, block_c, block_r, warps, nrb, lim, T, bpp, _cdiv(g.C, block_c))


def plan_of(x: torch.Tensor, G: int, K: int, pool_batch: bool, channels_last: bool) -> _Plan:
    """The launch plan of the canonical ``x`` (see :func:`_canonical`), computed once per (shape, layout, groups,
    device, ``TUNING``)."""
    return _cached_plan(tuple(x.shape), G, K, pool_batch, channels_last, x.device, TUNING)


def _scratch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A float32 buffer the kernels fill completely before they read it (never zeroed)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _canonical(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` contiguous or channels_last (copied only when it is neither), and whether it is channels_last."""
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


def _like(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _vec(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A flat contiguous vector, or a placeholder pointer for an absent one (never read)."""
    if t is None:
        return like
    return t if t.dim() == 1 and t.is_contiguous() else t.reshape(-1).contiguous()


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """At least ``n`` int32 counters at 0 on ``device``, for the kernels' "last program merges" tickets: every
    launch leaves them at 0 again, so they are zeroed once, when first allocated (a device op, on the first step
    only). One set per device; a larger set, when needed, is added and the smaller kept alive (a captured CUDA
    graph may hold its address). Launches on one device run one at a time (one stream): concurrent streams would
    share the counters."""
    held = _COUNTERS.get(device)
    if held is None or held[-1].numel() < n:
        held = _COUNTERS.setdefault(device, [])
        held.append(torch.zeros(max(n, 1024, 2 * held[-1].numel() if held else 0), device=device, dtype=torch.int32))
    return held[-1]


def _running_args(running: Optional[Running], m: int, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """The running update's arguments of ``norm._stats_kernel``: ``(rm, rv, nbt, skip, momentum, unbias)``
    and the constexprs (``running`` None: placeholders, never read)."""
    if running is None:
        return (dummy, dummy, dummy, dummy, 0.0, 1.0), dict(RUNNING=False, CUMULATIVE=False, HAS_NBT=False,
                                                             HAS_SKIP=False)  # fmt: skip
    nbt, skip = running.num_batches_tracked, running.num_skipped
    if running.momentum is None and nbt is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    args = (running.mean, running.var, dummy if nbt is None else nbt, dummy if skip is None else skip,
            0.0 if running.momentum is None else float(running.momentum), m / max(m - 1, 1))  # fmt: skip
    flags = dict(RUNNING=True, CUMULATIVE=running.momentum is None, HAS_NBT=nbt is not None, HAS_SKIP=skip is not None)
    return args, flags


def _apply(x, w, b, mean, var, rstd, lp: _Plan, eps: float, act: Activation, shared: bool = False) -> torch.Tensor:
    """y: x normalized with the flat ``mean`` and ``rstd`` of :func:`norm._stats_kernel` (``var`` None), or with
    the given ``mean`` and ``var`` (then ``rstd = 1 / sqrt(var + eps)`` is written into ``rstd``); ``shared``: the
    given statistics hold one value per group, for every sample."""
    y = torch.empty_like(x)
    g = lp.g
    norm._apply_kernel[(g.N * lp.nrb, lp.grid_c)](
        x, y, _vec(w, mean), _vec(b, mean), mean, mean if var is None else var, rstd, eps,
        g.C, g.R, g.G, g.K, g.s_n, g.s_c, g.s_r, lp.nrb,
        **act.args, POOL_BATCH=g.pool_batch, HAS_W=w is not None, HAS_B=b is not None,
        USE_INPUT_STATS=var is None, SHARED_STATS=shared, **lp.fwd,
    )  # fmt: skip
    return y


@_on_device_of(0)
def norm_fwd(
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    G: int,
    K: int,
    pool_batch: bool,
    eps: float,
    act: Activation = NO_ACTIVATION,
    running: Optional[Running] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward: ``(y, mean, rstd, var)`` with the input's own statistics (flat, float32), in two
    launches (:func:`norm._stats_kernel`, :func:`norm._apply_kernel`). ``running``: buffers that take the
    statistics, in the first launch (per-channel statistics only, ``K == 1``: batch and instance norm)."""
    x, cl = _canonical(x)
    lp = plan_of(x, G, K, pool_batch, cl)
    g, T, dev = lp.g, lp.T, x.device
    if running is not None and K != 1:
        raise ValueError(f"running statistics need one statistic per channel (K = 1), got K = {K}")
    part = _scratch((3, g.out, g.C, T), dev)
    mean, var, rstd = _scratch((g.S,), dev), _scratch((g.S,), dev), _scratch((g.S,), dev)
    rargs, rflags = _running_args(running, g.m, mean)
    mb = TUNING.merge_block
    norm._stats_kernel[(g.out * T, lp.grid_c)](
        x, part, mean, var, rstd, _counters(lp.counters, dev), *rargs[:4], eps, *rargs[4:],
        g.C, g.R, g.G, g.K, g.s_n, g.s_c, g.s_r, lp.nrb, lp.lim, T, g.out, lp.bpp,
        **act.args, CHANNEL_STATS=K == 1, **rflags, BLOCK_S=mb, BLOCK_J=mb, **lp.fwd,
    )  # fmt: skip
    return _apply(x, w, b, mean, None, rstd, lp, eps, act), mean, rstd, var


@_on_device_of(0)
def norm_apply(
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    mean: torch.Tensor,
    var: torch.Tensor,
    G: int,
    K: int,
    pool_batch: bool,
    eps: float,
    act: Activation = NO_ACTIVATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval forward, one launch: ``(y, rstd)``, y normalized with the given ``mean`` and ``var`` (flat, any float
    dtype: one per statistic, or one per group for every sample), ``rstd = 1 / sqrt(var + eps)`` flat float32,
    one per statistic."""
    x, cl = _canonical(x)
    lp = plan_of(x, G, K, pool_batch, cl)
    rstd = _scratch((lp.g.S,), x.device)
    return _apply(x, w, b, mean, var, rstd, lp, eps, act, shared=mean.numel() != lp.g.S), rstd


def _grad_buffers(x, w, b, need_dx: bool) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(dx, dw, db)`` outputs: dx like the canonical x (None unless ``need_dx``); dw, db flat in w's and b's
    dtypes, empty when absent."""
    dw = x.new_empty(w.numel() if w is not None else 0, dtype=w.dtype if w is not None else torch.float32)
    db = x.new_empty(b.numel() if b is not None else 0, dtype=b.dtype if b is not None else torch.float32)
    return (torch.empty_like(x) if need_dx else None), dw, db


@_on_device_of(1)
def norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    G: int,
    K: int,
    pool_batch: bool,
    act: Activation = NO_ACTIVATION,
    use_input_stats: bool = True,
    need_dx: bool = True,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Backward: ``(dx, dw, db)``; dx None unless ``need_dx``; dw and db are empty when w or b is None (flat, in
    w's and b's dtype). ``use_input_stats``: mean and rstd were the input's own and carry gradient. Two launches
    (:func:`norm._grad_stats_kernel`: dw, db, c1, c2; :func:`norm._dx_kernel`); one when only dx or only dw, db
    is needed."""
    x, cl = _canonical(x)
    dy = _like(dy, cl)
    lp = plan_of(x, G, K, pool_batch, cl)
    g, T, dev = lp.g, lp.T, x.device
    flags = dict(POOL_BATCH=g.pool_batch, HAS_W=w is not None, HAS_B=b is not None)
    w_, b_ = _vec(w, mean), _vec(b, mean)
    dx, dw, db = _grad_buffers(x, w, b, need_dx)
    coef = mean  # placeholder pointer: never read without the input's own statistics
    need_coef = need_dx and use_input_stats
    if need_coef or w is not None or b is not None:
        part = _scratch((2, g.out, g.C, T), dev)
        q = _scratch((2, g.out, g.C), dev) if need_coef and K != 1 else part  # else a placeholder
        if need_coef:
            coef = _scratch((2, g.S), dev)
        mb = TUNING.merge_block
        norm._grad_stats_kernel[(g.out * T, lp.grid_c)](
            dy, x, w_, b_, mean, rstd, part, q, dw if w is not None else part, db if b is not None else part, coef,
            _counters(lp.counters, dev), 1.0 / g.m, g.C, g.R, g.G, g.K, g.s_n, g.s_c, g.s_r, lp.nrb, lp.lim, T,
            g.out, lp.bpp, **act.args, **flags, CHANNEL_STATS=K == 1, COEF=need_coef,
            BLOCK_T=mb, BLOCK_S=mb, BLOCK_K=min(mb, _pow2(g.K)), **lp.fwd,
        )  # fmt: skip
    if need_dx:
        norm._dx_kernel[(g.N * lp.nrb, lp.grid_c)](
            dy, x, dx, w_, b_, mean, rstd, coef, g.S, g.C, g.R, g.G, g.K, g.s_n, g.s_c, g.s_r, lp.nrb,
            **act.args, **flags, USE_INPUT_STATS=use_input_stats, **lp.fwd,
        )  # fmt: skip
    return dx, dw, db


# Row path (per-sample statistics along contiguous rows of K values: layer norm).


@dataclass(frozen=True)
class _RowPlan:
    """How the row kernels run over ``N`` rows of ``K`` values."""

    block_n: int  # rows per tile
    block_k: int  # columns per tile
    single: bool  # whole rows in one tile (K <= BLOCK_K)
    warps: int
    bpp: int  # backward: row blocks per program
    P: int  # backward: programs, each with its own row of partial sums of dw and db


@functools.lru_cache(maxsize=1024)
def _cached_row_plan(N: int, K: int, device: torch.device, t: Tuning) -> _RowPlan:
    single = _pow2(K) <= t.row_max
    block_k = _pow2(K) if single else _pow2(t.row_chunk)
    block_n = t.row_block_n or max(1, t.tile // block_k)
    n_blocks = _cdiv(N, block_n)
    bpp = _cdiv(n_blocks, min(n_blocks, _target_programs(device, t)))
    return _RowPlan(block_n, block_k, single, min(16, max(4, block_n * block_k // 512)), bpp, _cdiv(n_blocks, bpp))


def row_plan_of(N: int, K: int, device: torch.device) -> _RowPlan:
    """The row path's launch plan: whole rows in one tile when ``K`` fits ``TUNING.row_max``, else chunks of
    ``TUNING.row_chunk`` columns; about ``TUNING.tile`` elements per tile. Computed once per (N, K, device,
    ``TUNING``)."""
    return _cached_row_plan(N, K, device, TUNING)


@_on_device_of(0)
def layer_fwd(
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    N: int,
    K: int,
    eps: float,
    act: Activation = NO_ACTIVATION,
    stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of the row path: ``(y, mean, rstd, var)``, statistics flat ``(N,)`` float32. ``x`` holds ``N`` rows
    of ``K`` values in logical order; ``stats``: given flat float32 ``(mean, var)`` (eval), else None for the rows'
    own (then computed)."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    use_input_stats = stats is None
    if use_input_stats:
        mean = torch.empty(N, device=x.device, dtype=torch.float32)
        var = torch.empty(N, device=x.device, dtype=torch.float32)
    else:
        mean, var = stats
    rstd = torch.empty(N, device=x.device, dtype=torch.float32)
    rp = row_plan_of(N, K, x.device)
    norm._layer_fwd_kernel[(_cdiv(N, rp.block_n),)](
        xc, y, _vec(w, mean), _vec(b, mean), mean, var, rstd, eps, N, K,
        **act.args, HAS_W=w is not None, HAS_B=b is not None, USE_INPUT_STATS=use_input_stats,
        SINGLE=rp.single, BLOCK_N=rp.block_n, BLOCK_K=rp.block_k, num_warps=rp.warps,
    )  # fmt: skip
    return y, mean, rstd, var


@_on_device_of(1)
def layer_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: Optional[torch.Tensor],
    b: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    N: int,
    K: int,
    act: Activation = NO_ACTIVATION,
    use_input_stats: bool = True,
    need_dx: bool = True,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Backward of the row path: ``(dx, dw, db)``; dx None unless ``need_dx``; dw and db flat ``(K,)`` in w's and
    b's dtypes, empty when absent. Each of ``P`` programs owns a run of row blocks and writes its own ``(K,)``
    partial sums of dw and db; a second kernel adds the ``P`` partials in index order (deterministic, no
    atomics)."""
    xc, dyc = x.contiguous(), dy.contiguous()
    rp = row_plan_of(N, K, x.device)
    P = rp.P
    part = _scratch((2, P, K), x.device)
    dx, dw, db = _grad_buffers(xc, w, b, need_dx)
    w_, b_ = _vec(w, mean), _vec(b, mean)
    norm._layer_bwd_kernel[(P,)](
        dyc, xc, xc if dx is None else dx, w_, b_, mean, rstd, part, N, K, rp.bpp,
        **act.args, HAS_W=w is not None, HAS_B=b is not None, USE_INPUT_STATS=use_input_stats,
        NEED_DX=need_dx, SINGLE=rp.single, BLOCK_N=rp.block_n, BLOCK_K=rp.block_k, num_warps=rp.warps,
    )  # fmt: skip
    if w is not None or b is not None:
        mb = TUNING.merge_block
        # 64 columns a program (256 bytes of each partial row): K / 64 programs share the 2 P K floats, e.g. 64
        # for K = 4096 (16 with 256 columns a program)
        norm._layer_grad_merge_kernel[(_cdiv(K, mb),)](
            part, dw if w is not None else part, db if b is not None else part, P, K,
            HAS_W=w is not None, HAS_B=b is not None, BLOCK_K=mb, BLOCK_P=mb,
        )  # fmt: skip
    return dx, dw, db
