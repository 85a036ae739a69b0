"""GPU benchmark: normlab's norms (Triton kernels where supported) against PyTorch, on a CUDA machine.

One prepared run in three steps. (1) It measures the card's copy bandwidth: a 2 GiB device-to-device copy, bytes read
plus bytes written over the back-to-back time below. (2) It checks normlab against torch on every real shape (output
and gradients; the reference is torch in float32 on the same input values). (3) It times every case and prints one
row: normlab, each peer, best peer / normlab (> 1: normlab is faster) and the share of the memory floor normlab
reaches. The floor counts the passes a fused kernel cannot avoid at the measured copy bandwidth: training (forward +
backward) 5 passes over x's bytes (read x, write y; read x, read dy, write dx), eval forward 2 (read x, write y).

Two timers, both medians, both reported:

- back to back (the targets, the ratios and "% of floor" use this one): a loop of calls issued one after another,
  timed with CUDA events around the loop, the inputs rotating over as many sets as keep each call's inputs out of
  L2. This is what a training loop sees: when the host takes longer per call than the GPU, the host's time counts.
- flushed: ``triton.testing.do_bench``, which zeroes 256 MB before every call to empty L2. While the GPU zeroes,
  the host already enqueues the call (a head start of the zeroing's length, 256 MB over the bandwidth: ~60 us on an
  H200, ~85 us on an H100, which no training loop gets), so this timer hides up to that much host time per call; it
  is kept as the cold-cache figure the H100 notes used.

Peers: batch norm: eager cuDNN, eager native (``torch.backends.cudnn.flags(enabled=False)``) and
``torch.compile`` of ``F.relu(F.batch_norm(...))``; group and layer norm: eager and ``torch.compile``, given w and
b already in x's dtype (the cast stays out of the timed call). normlab runs through :mod:`normlab.functional`
(autograd and running statistics included, as a user calls it) with float32 w and b; the ``backend`` column says
whether the Triton kernels or the torch path ran. A training call returns its gradients (``torch.autograd.grad``)
rather than accumulating them into ``.grad``, as for a layer inside a network.

    python benchmarks/gpu.py [--quick] [--budget-s S] [--start N] [--commit SHA] [results.json]

The JSON is rewritten (atomically) after every timed case, so a run stopped at its time limit keeps what it timed;
past ``--budget-s`` seconds no new case is started and the rest are listed as skipped (``--start N`` resumes at case
N in a second run).

``--dry-run`` runs the script's logic on CPU with tiny shapes (set ``TRITON_INTERPRET=1`` for the kernels) and a
plain timer instead of CUDA events and ``do_bench``: a check that the script itself works, not a measurement (its
"copy bandwidth" is a CPU memcpy, labelled so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from cpu import _commit  # benchmarks/ is sys.path[0] when this file runs as a script

import normlab.functional as NF
from normlab import backend
from normlab.spec import plan

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (6e-2, 6e-2), torch.float16: (1e-2, 1e-2)}
COPY_BYTES = 2 << 30  # per buffer: dozens of times the 50-60 MB L2, so the copy runs at HBM speed
BACK_TO_BACK_MS = 20.0  # length of one timed loop; REPEATS loops give the median
REPEATS = 5
BUDGET_S = 300.0  # default: no case is started after this; the estimate for the full matrix is ~3-5 min on an H200

# (kind, shape, dtype, layout, mode): mode "train" = forward + backward, "eval" = forward with running stats.
# The batch-norm training rows are the peer matrix of shared/notes/h100-measurements.md, which the targets name.
FULL = [
    ("batch", (256, 64, 56, 56), "bf16", "NCHW", "train"),
    ("batch", (256, 64, 56, 56), "bf16", "NHWC", "train"),
    ("batch", (256, 64, 56, 56), "fp32", "NCHW", "train"),
    ("batch", (256, 64, 56, 56), "fp32", "NHWC", "train"),
    ("batch", (256, 256, 56, 56), "bf16", "NCHW", "train"),
    ("batch", (256, 256, 56, 56), "bf16", "NHWC", "train"),
    ("batch", (256, 256, 56, 56), "fp32", "NCHW", "train"),
    ("batch", (256, 256, 56, 56), "fp32", "NHWC", "train"),
    ("batch", (256, 2048, 7, 7), "bf16", "NCHW", "train"),
    ("batch", (256, 2048, 7, 7), "bf16", "NHWC", "train"),
    ("batch", (256, 2048, 7, 7), "fp32", "NCHW", "train"),
    ("batch", (256, 2048, 7, 7), "fp32", "NHWC", "train"),
    ("batch", (128, 128, 28, 28), "bf16", "NCHW", "train"),
    ("batch", (128, 128, 28, 28), "bf16", "NHWC", "train"),
    ("batch", (128, 128, 28, 28), "fp32", "NCHW", "train"),
    ("batch", (128, 128, 28, 28), "fp32", "NHWC", "train"),
    ("batch", (8192, 4096), "bf16", "NC", "train"),
    ("batch", (8192, 4096), "fp32", "NC", "train"),
    ("batch", (32, 64, 112, 112), "bf16", "NCHW", "train"),
    ("batch", (32, 64, 112, 112), "bf16", "NHWC", "train"),
    ("batch", (32, 64, 112, 112), "fp32", "NCHW", "train"),
    ("batch", (32, 64, 112, 112), "fp32", "NHWC", "train"),
    ("batch", (256, 64, 56, 56), "bf16", "NCHW", "eval"),
    ("batch", (256, 64, 56, 56), "bf16", "NHWC", "eval"),
    ("batch", (256, 2048, 7, 7), "bf16", "NHWC", "eval"),
    ("batch", (8192, 4096), "bf16", "NC", "eval"),
    ("group", (32, 320, 64, 64), "bf16", "NCHW", "train"),
    ("group", (32, 320, 64, 64), "bf16", "NHWC", "train"),
    ("group", (8, 512, 128, 128), "bf16", "NCHW", "train"),
    ("group", (8, 512, 128, 128), "bf16", "NHWC", "train"),
    ("group", (256, 256, 28, 28), "fp32", "NHWC", "train"),
    ("layer", (16384, 1024), "bf16", "NC", "train"),
    ("layer", (8192, 4096), "bf16", "NC", "train"),
    ("layer", (8192, 4096), "fp32", "NC", "train"),
]
QUICK = [
    ("batch", (256, 64, 56, 56), "bf16", "NCHW", "train"),
    ("batch", (256, 64, 56, 56), "bf16", "NHWC", "train"),
    ("batch", (256, 2048, 7, 7), "bf16", "NHWC", "train"),
    ("batch", (8192, 4096), "fp32", "NC", "train"),
    ("batch", (256, 64, 56, 56), "bf16", "NHWC", "eval"),
    ("group", (32, 320, 64, 64), "bf16", "NHWC", "train"),
    ("layer", (16384, 1024), "bf16", "NC", "train"),
]
GROUPS = 32
DEVICE = "cuda"
DRY_RUN = False
ACTIVATION = {"batch": "relu", "group": "silu", "layer": None}
TIMERS = {
    "back_to_back": "median ms per call over loops of calls issued back to back, CUDA events around each loop, "
                    "inputs rotating over enough sets to keep them out of L2",
    "flushed": "triton.testing.do_bench median, 256 MB zeroed before each call (L2 flushed; the host enqueues "
               "during the flush, so up to the flush's length, ~60 us on an H200, of host time per call is hidden)",
}
TARGETS_USE = ("back_to_back: a training loop issues its steps back to back and never gets the flush's head start, "
               "so host time counts whenever it exceeds the GPU time")


def _inputs(kind, shape, dtype, layout):
    x = torch.randn(shape, device=DEVICE, dtype=torch.float32).mul_(2.0).add_(0.5).to(dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    n_affine = shape[-1] if kind == "layer" else shape[1]
    w = torch.rand(n_affine, device=DEVICE, dtype=torch.float32).add_(0.5)
    b = torch.randn(n_affine, device=DEVICE, dtype=torch.float32)
    dy = torch.randn_like(x)
    return x, w, b, dy


def _running(shape):
    return torch.zeros(shape[1], device=DEVICE), torch.ones(shape[1], device=DEVICE)


def _normlab_fn(kind, shape, mode):
    """normlab as a user calls it: (x, w, b) -> y."""
    if kind == "batch":
        rm, rv = _running(shape)
        return lambda x, w, b: NF.batch_norm(x, rm, rv, w, b, training=(mode == "train"), activation="relu")
    if kind == "group":
        return lambda x, w, b: NF.group_norm(x, GROUPS, w, b, activation="silu")
    return lambda x, w, b: NF.layer_norm(x, shape[-1], w, b)


def _torch_fn(kind, shape, mode):
    """The eager torch composition normlab fuses: (x, w, b) -> y (group and layer norm want w, b in x's dtype)."""
    if kind == "batch":
        rm, rv = _running(shape)
        return lambda x, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, training=(mode == "train")))
    if kind == "group":
        return lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w, b))
    return lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b)


def _peer_weights(kind, x, w, b):
    """w, b as the peers take them: float32 for batch norm (cuDNN's mixed mode), else in x's dtype as a half-precision
    model holds them; cast here, outside the timed call."""
    return (w, b) if kind == "batch" else (w.to(x.dtype), b.to(x.dtype))


def _peers(kind, shape, mode):
    torch._dynamo.reset()  # every case's lambda shares one code object: a fresh cache, not the recompile limit
    eager = _torch_fn(kind, shape, mode)
    peers = {}
    if kind == "batch":
        peers["cudnn"] = eager

        def native(x, w, b):
            with torch.backends.cudnn.flags(enabled=False):
                return eager(x, w, b)

        peers["native"] = native
    else:
        peers["eager"] = eager
    peers["compile"] = torch.compile(_torch_fn(kind, shape, mode), dynamic=False, backend=_compile_backend())
    return peers


def _compile_backend():
    return "aot_eager" if DRY_RUN else "inductor"


def _tiny(shape):
    """A small stand-in for ``shape`` with the same rank (channels kept divisible by the 32 groups)."""
    return (2, 64) + (3,) * (len(shape) - 2) if len(shape) > 2 else (8, 64)


def _call(fn, x, w, b, dy, mode):
    """One call as a network makes it: a forward (eval) or a forward + backward (train) that returns the gradients
    of x, w and b instead of accumulating them into ``.grad`` (an accumulation would add a pass over dx)."""
    if mode == "eval":

        def forward():
            with torch.no_grad():
                fn(x, w, b)

        return forward
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)


def _loop_ms(calls, n: int) -> float:
    """Milliseconds per call of ``n`` calls issued back to back, cycling through ``calls``."""
    if DRY_RUN:
        t = time.perf_counter()
        for i in range(n):
            calls[i % len(calls)]()
        return (time.perf_counter() - t) * 1e3 / n
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(n):
        calls[i % len(calls)]()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def _back_to_back(calls, n: int) -> float:
    """Median over REPEATS loops of :func:`_loop_ms` (one loop on the dry run)."""
    return statistics.median(_loop_ms(calls, n) for _ in range(1 if DRY_RUN else REPEATS))


def _flushed(call) -> float:
    if DRY_RUN:
        t = time.perf_counter()
        call()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(call, return_mode="median")


def _n_sets(x, dy, l2_bytes: int) -> int:
    """How many input sets the back-to-back loop rotates over: enough that the other sets' traffic (x and dy read, as
    much written) between two uses of one set is at least twice the L2, at most 8."""
    per_set = 2 * (x.numel() * x.element_size() + dy.numel() * dy.element_size())
    return 2 if DRY_RUN else min(8, 1 + math.ceil(2 * l2_bytes / per_set))


def _bench(fn, sets, w, b, mode) -> dict:
    """Both timers for ``fn`` over the input sets ``[(x, dy), ...]``: {"back_to_back": ms, "flushed": ms}."""
    calls = [_call(fn, x, w, b, dy, mode) for x, dy in sets]
    for call in calls:
        call()  # warm up: compiles, autotunes, and touches every set once
    flushed = _flushed(calls[0])
    # loops of ~BACK_TO_BACK_MS, sized from a short loop (not from the flushed time, which hides host time)
    n = 2 if DRY_RUN else min(2000, max(10, math.ceil(BACK_TO_BACK_MS / _loop_ms(calls, 10))))
    return {"back_to_back": _back_to_back(calls, n), "flushed": flushed}


def _copy_bandwidth() -> tuple[float, str]:
    """Bytes read + written per second by one large copy, timed back to back; and what was measured, in words."""
    n = (64 << 20) if DRY_RUN else COPY_BYTES
    src = torch.ones(n // 4, device=DEVICE)
    dst = torch.empty_like(src)
    copy = [lambda: dst.copy_(src)]
    copy[0]()
    ms = _back_to_back(copy, 2 if DRY_RUN else 20)
    what = (f"CPU memcpy of {n >> 20} MiB on the dry run: not a GPU figure" if DRY_RUN else
            f"device-to-device copy of {n >> 30} GiB, bytes read + written, back-to-back timer")
    return 2 * n / (ms * 1e-3), what


def err_over_tol(a: torch.Tensor, r: torch.Tensor, dtype: torch.dtype, m: int = 1) -> float:
    """Largest |a - r| / (atol * sqrt(m) + rtol * |r|) over the entries, (atol, rtol) = TOL[dtype]: <= 1 passes.

    ``m`` is how many values each entry sums (dw and db of a norm sum N * R values per channel): their rounding error
    grows like sqrt(m), so atol scales with it; rtol does not, so a relative error (a wrong scale, a missing share of
    the sum) fails however large m is. NaN anywhere fails."""
    atol, rtol = TOL[dtype]
    a, r = a.detach().float(), r.detach().float()
    return float(((a - r).abs() / (atol * math.sqrt(m) + rtol * r.abs())).max())


def _check(kind, shape, mode, x, w, b, dy) -> dict:
    """normlab against torch in float32 on the same values: {"y": err_over_tol, ...} (and dx, dw, db in training)."""
    f_nl, f_ref = _normlab_fn(kind, shape, mode), _torch_fn(kind, shape, mode)
    train = mode == "train"
    xs, ws, bs = (t.detach().requires_grad_(train) for t in (x, w, b))
    xr, wr, br = (t.detach().float().requires_grad_(train) for t in (x, w, b))
    y, yr = f_nl(xs, ws, bs), f_ref(xr, wr, br)
    errs = {"y": err_over_tol(y, yr, x.dtype)}
    if train:
        got = torch.autograd.grad(y, (xs, ws, bs), dy)
        want = torch.autograd.grad(yr, (xr, wr, br), dy.float())
        m = x.numel() // w.numel()
        errs["dx"] = err_over_tol(got[0], want[0], x.dtype)
        # dw, db are float32 sums over the same values on both sides, whatever x's dtype: float32's tolerance
        errs["dw"] = err_over_tol(got[1], want[1], w.dtype, m)
        errs["db"] = err_over_tol(got[2], want[2], w.dtype, m)
    return errs


def summary(rows: list[dict]) -> list[str]:
    """The issue's targets on the back-to-back times: what each asks, what was measured, whether it holds."""
    sel = lambda kind, mode: [r for r in rows if r["kind"] == kind and r["mode"] == mode]
    bn = [r["best_peer_over_normlab"] for r in sel("batch", "train")]
    ev = [r["peers_ms"]["compile"]["back_to_back"] / r["normlab_ms"]["back_to_back"] for r in sel("batch", "eval")]
    gn = [r["best_peer_over_normlab"] for r in sel("group", "train")]
    checks = [
        ("BN+ReLU train: geometric mean of best peer / normlab >= 1.5", bn, statistics.geometric_mean, 1.5),
        ("BN+ReLU train: every row >= 0.95", bn, min, 0.95),
        ("BN+ReLU eval: every row compile / normlab >= 0.95", ev, min, 0.95),
        ("GN+SiLU train: geometric mean of best peer / normlab >= 2", gn, statistics.geometric_mean, 2.0),
    ]
    lines = []
    for what, values, agg, bound in checks:
        if values:
            value = agg(values)
            lines.append(f"{what}: {value:.2f} over {len(values)} rows, {'holds' if value >= bound else 'MISSED'}")
        else:
            lines.append(f"{what}: no row timed")
    return lines


def _write_json(path: Path, out: dict) -> None:
    """Replace ``path`` atomically: a run stopped mid-write leaves the previous version, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


def _label(kind, shape, dname, layout, mode) -> str:
    return f"{kind} {mode} {'x'.join(map(str, shape))} {dname} {layout}"


def _device_info() -> dict:
    """The card (None on the dry run) and the copy bandwidth measured now."""
    gpu = None
    if not DRY_RUN:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = {"name": props.name, "multiprocessors": props.multi_processor_count,
               "l2_bytes": props.L2_cache_size, "memory_bytes": props.total_memory}  # fmt: skip
    bw, what = _copy_bandwidth()
    return {"gpu": gpu, "copy_bandwidth_bytes_per_s": bw, "copy_bandwidth_what": what}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="benchmarks/gpu_results.json", help="JSON results path")
    ap.add_argument("--quick", action="store_true", help="7 cases only (about 1-2 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no real timing: test this script")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no timed case after this many seconds")
    ap.add_argument("--start", type=int, default=0, help="begin at this case (to finish a run the budget cut short)")
    ap.add_argument("--commit", default=None, help="commit to record where the tree has no git history")
    args = ap.parse_args(argv)
    global DEVICE, DRY_RUN
    if args.dry_run:
        DEVICE, DRY_RUN = "cpu", True
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    t_start = time.time()
    cases = (QUICK if args.quick else FULL)[args.start:]
    if DRY_RUN:  # one tiny stand-in per (kind, dtype, layout, mode)
        cases = list(dict.fromkeys((k, _tiny(s), d, lay, m) for k, s, d, lay, m in cases))
    info = _device_info()
    out = {
        "device": "cpu (dry run)" if DRY_RUN else info["gpu"]["name"], **info,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or _commit() or "unknown", "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "quick": args.quick, "timers": TIMERS, "targets_use": TARGETS_USE,
    }  # fmt: skip
    bw_txt = f"{info['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s ({info['copy_bandwidth_what']})"
    print(f"{out['device']}, {out['date']}, commit {out['commit']}, torch {torch.__version__}, "
          f"triton {triton.__version__}, {len(cases)} cases")
    print(f"copy bandwidth {bw_txt}; ratios and % floor use the back-to-back times ({TARGETS_USE.split(':')[0]})")

    # 1. correctness on every real shape before any timing
    checks, failed = [], 0
    for i, (kind, shape, dname, layout, mode) in enumerate(cases):
        torch.manual_seed(args.start + i)
        x, w, b, dy = _inputs(kind, shape, DTYPES[dname], layout)
        p = plan(kind, shape, groups=GROUPS if kind == "group" else None,
                 normalized_ndim=1 if kind == "layer" else None)  # fmt: skip
        used = "triton" if backend.select(x, p).__name__.endswith("kernels") else "torch"
        errs = _check(kind, shape, mode, x, w, b, dy)
        ok = all(e <= 1.0 for e in errs.values())  # False for NaN
        failed += not ok
        checks.append({"case": _label(kind, shape, dname, layout, mode), "backend": used, "check_ok": ok,
                       "check_err_over_tol": errs})  # fmt: skip
        print(f"check {checks[-1]['case']:<44} {used:<6} {'ok' if ok else 'FAIL'} "
              + " ".join(f"{k}={v:.3g}" for k, v in errs.items()))
        del x, w, b, dy
    out["checks"] = checks
    print(f"{failed} case(s) failed the correctness check (error / tolerance > 1); {time.time() - t_start:.0f} s")

    # 2. timing
    header = (f"{'case':<44} {'backend':<7} {'normlab b2b/flushed':>19}  {'peers b2b/flushed (ms)':<58} "
              f"{'best/nl':>7} {'%floor':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows, skipped = [], []
    out_path = Path(args.out)
    for i, ((kind, shape, dname, layout, mode), chk) in enumerate(zip(cases, checks)):
        if time.time() - t_start > args.budget_s:
            skipped.append(chk["case"])
            continue
        torch.manual_seed(args.start + i)  # set 0 is the checked one
        x, w, b, dy = _inputs(kind, shape, DTYPES[dname], layout)
        sets = [(x, dy)]
        for _ in range(_n_sets(x, dy, (info["gpu"] or {}).get("l2_bytes", 0)) - 1):
            x_more, _, _, dy_more = _inputs(kind, shape, DTYPES[dname], layout)
            sets.append((x_more, dy_more))
        t_nl = _bench(_normlab_fn(kind, shape, mode), sets, w, b, mode)
        wp, bp = _peer_weights(kind, x, w, b)
        peers = {k: _bench(f, sets, wp, bp, mode) for k, f in _peers(kind, shape, mode).items()}
        best = min(peers, key=lambda k: peers[k]["back_to_back"])
        passes = 5 if mode == "train" else 2
        floor_ms = passes * x.numel() * x.element_size() / info["copy_bandwidth_bytes_per_s"] * 1e3
        row = {
            "kind": kind, "shape": list(shape), "dtype": dname, "layout": layout, "mode": mode,
            "activation": ACTIVATION[kind], "backend": chk["backend"], "check_ok": chk["check_ok"],
            "check_err_over_tol": chk["check_err_over_tol"], "input_sets": len(sets),
            "normlab_ms": t_nl, "peers_ms": peers, "best_peer": best,
            "best_peer_over_normlab": peers[best]["back_to_back"] / t_nl["back_to_back"],
            "best_peer_over_normlab_flushed": min(v["flushed"] for v in peers.values()) / t_nl["flushed"],
            "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / t_nl["back_to_back"],
            "pct_of_floor_flushed": 100.0 * floor_ms / t_nl["flushed"],
        }  # fmt: skip
        rows.append(row)
        peer_txt = " ".join(f"{k}={v['back_to_back']:.3f}/{v['flushed']:.3f}" for k, v in peers.items())
        nl_txt = f"{t_nl['back_to_back']:.3f}/{t_nl['flushed']:.3f}"
        print(f"{chk['case']:<44} {chk['backend']:<7} {nl_txt:>19}  {peer_txt:<58} "
              f"{row['best_peer_over_normlab']:7.2f} {row['pct_of_floor']:6.1f}")
        del x, w, b, dy, sets
        if not DRY_RUN:
            torch.cuda.empty_cache()
        _write_json(out_path, {**out, "rows": rows, "skipped": skipped, "seconds": time.time() - t_start})
    out.update(rows=rows, skipped=skipped, summary=summary(rows), seconds=time.time() - t_start)
    _write_json(out_path, out)
    for line in out["summary"]:
        print(line)
    if skipped:
        print(f"skipped past the {args.budget_s:.0f} s budget: {', '.join(skipped)}")
    print(f"wrote {args.out}; {failed} case(s) failed the correctness check; {time.time() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
