"""GPU benchmark: normlab's norms (Triton kernels where supported) against PyTorch, on a CUDA machine.

For every case it first checks normlab against torch on the real shape (output and gradients, float32 reference
computed by torch from the same inputs), then times with ``triton.testing.do_bench`` (which flushes L2 between
runs) and prints one row: normlab, each peer, the ratio best-peer / normlab (> 1: normlab is faster) and the
share of the HBM floor normlab reaches. The floor counts the passes a fused kernel cannot avoid at 3.0 TB/s:
training (forward + backward) 5 passes over x's bytes (read x, write y; read x, read dy, write dx), eval forward
2 (read x, write y).

Peers: batch norm: eager cuDNN, eager native (``torch.backends.cudnn.flags(enabled=False)``) and
``torch.compile`` of ``F.relu(F.batch_norm(...))``; group and layer norm: eager and ``torch.compile``.
normlab runs through :mod:`normlab.functional` (autograd and running statistics included, as a user calls it);
the ``backend`` column says whether the Triton kernels or the torch path ran.

    python benchmarks/gpu.py [--quick] [results.json]

``--dry-run`` runs the script's logic on CPU with tiny shapes (set ``TRITON_INTERPRET=1`` for the kernels) and a
plain timer instead of ``do_bench``: a check that the script itself works, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

import normlab.functional as NF
from normlab import backend
from normlab.spec import plan

HBM_BYTES_PER_S = 3.0e12
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
TOL = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (6e-2, 6e-2), torch.float16: (1e-2, 1e-2)}

# (kind, shape, dtype, layout, mode): mode "train" = forward + backward, "eval" = forward with running stats.
FULL = [
    ("batch", (256, 64, 56, 56), "bf16", "NCHW", "train"),
    ("batch", (256, 64, 56, 56), "bf16", "NHWC", "train"),
    ("batch", (256, 64, 56, 56), "fp32", "NCHW", "train"),
    ("batch", (256, 64, 56, 56), "fp32", "NHWC", "train"),
    ("batch", (256, 256, 56, 56), "bf16", "NCHW", "train"),
    ("batch", (256, 256, 56, 56), "bf16", "NHWC", "train"),
    ("batch", (256, 256, 56, 56), "fp32", "NCHW", "train"),
    ("batch", (256, 2048, 7, 7), "bf16", "NCHW", "train"),
    ("batch", (256, 2048, 7, 7), "bf16", "NHWC", "train"),
    ("batch", (256, 2048, 7, 7), "fp32", "NHWC", "train"),
    ("batch", (128, 128, 28, 28), "bf16", "NHWC", "train"),
    ("batch", (32, 64, 112, 112), "bf16", "NHWC", "train"),
    ("batch", (8192, 4096), "bf16", "NC", "train"),
    ("batch", (8192, 4096), "fp32", "NC", "train"),
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
    """The eager torch composition normlab fuses, with half-precision weights cast as autocast would."""
    if kind == "batch":
        rm, rv = _running(shape)
        return lambda x, w, b: F.relu(F.batch_norm(x, rm, rv, w, b, training=(mode == "train")))
    if kind == "group":
        return lambda x, w, b: F.silu(F.group_norm(x, GROUPS, w.to(x.dtype), b.to(x.dtype)))
    return lambda x, w, b: F.layer_norm(x, (shape[-1],), w.to(x.dtype), b.to(x.dtype))


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


def _do_bench(fn, **kwargs):
    if DRY_RUN:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, return_mode="median", **kwargs)


def _tiny(shape):
    """A small stand-in for ``shape`` with the same rank (channels kept divisible by the 32 groups)."""
    return (2, 64) + (3,) * (len(shape) - 2) if len(shape) > 2 else (8, 64)


def _bench(fn, x, w, b, dy, mode):
    """Median milliseconds of one forward (eval) or forward + backward (train)."""
    if mode == "eval":
        with torch.no_grad():
            fn(x, w, b)  # warm up (compiles)
            return _do_bench(lambda: fn(x, w, b))
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))

    def step():
        fn(xs, ws, bs).backward(dy)

    step()  # warm up (compiles)
    return _do_bench(step, grad_to_none=[xs, ws, bs])


def _check(kind, shape, dtype, mode, x, w, b, dy):
    """normlab against torch: max abs error of y (and dx, dw, db in training), in units of the tolerance."""
    f_nl, f_ref = _normlab_fn(kind, shape, mode), _torch_fn(kind, shape, mode)
    atol, rtol = TOL[dtype]
    errs = {}
    xs, ws, bs = (t.detach().requires_grad_(mode == "train") for t in (x, w, b))
    xr, wr, br = (t.detach().float().requires_grad_(mode == "train") for t in (x, w, b))
    y, yr = f_nl(xs, ws, bs), f_ref(xr, wr, br)
    pairs = [("y", y, yr)]
    if mode == "train":
        y.backward(dy)
        yr.backward(dy.float())
        scale = math.sqrt(x.numel() / w.numel())  # dw, db sum over this many values per entry
        pairs += [("dx", xs.grad, xr.grad), ("dw", ws.grad, wr.grad, scale), ("db", bs.grad, br.grad, scale)]
    for name, a, r, *s in pairs:
        a, r = a.detach().float(), r.detach().float()
        bound = (atol + rtol * r.abs()) * (s[0] if s else 1.0)
        errs[name] = float(((a - r).abs() / bound).max())
    return errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="benchmarks/gpu_results.json", help="JSON results path")
    ap.add_argument("--quick", action="store_true", help="a few shapes only (about 5 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no real timing: test this script")
    args = ap.parse_args(argv)
    global DEVICE, DRY_RUN
    if args.dry_run:
        DEVICE, DRY_RUN = "cpu", True
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    cases = QUICK if args.quick else FULL
    if DRY_RUN:
        cases = [(k, _tiny(s), d, lay, m) for k, s, d, lay, m in cases]
    dev = "cpu (dry run)" if DRY_RUN else torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, triton {triton.__version__}, {len(cases)} cases")
    header = (
        f"{'case':<44} {'backend':<7} {'check':<5} {'normlab':>8} {'peers (ms)':<38} {'best/nl':>7} {'%floor':>6}"
    )
    print(header)
    print("-" * len(header))
    rows, failed = [], 0
    t_start = time.time()
    for kind, shape, dname, layout, mode in cases:
        dtype = DTYPES[dname]
        name = f"{kind} {mode} {'x'.join(map(str, shape))} {dname} {layout}"
        x, w, b, dy = _inputs(kind, shape, dtype, layout)
        p = plan(kind, shape, groups=GROUPS if kind == "group" else None,
                 normalized_ndim=1 if kind == "layer" else None)  # fmt: skip
        used = backend.select(x, p).__name__.rsplit(".", 1)[-1]
        used = "triton" if used == "kernels" else "torch"
        errs = _check(kind, shape, dtype, mode, x, w, b, dy)
        ok = all(e <= 1.0 for e in errs.values())
        failed += not ok
        t_nl = _bench(_normlab_fn(kind, shape, mode), x, w, b, dy, mode)
        peers = {k: _bench(f, x, w, b, dy, mode) for k, f in _peers(kind, shape, mode).items()}
        best = min(peers.values())
        passes = 5 if mode == "train" else 2
        floor_ms = passes * x.numel() * x.element_size() / HBM_BYTES_PER_S * 1e3
        row = {
            "kind": kind, "shape": list(shape), "dtype": dname, "layout": layout, "mode": mode,
            "activation": ACTIVATION[kind], "backend": used, "check_ok": ok, "check_err_over_tol": errs,
            "normlab_ms": t_nl, "peers_ms": peers, "best_peer_over_normlab": best / t_nl,
            "floor_ms": floor_ms, "pct_of_floor": 100.0 * floor_ms / t_nl,
        }  # fmt: skip
        rows.append(row)
        peer_txt = " ".join(f"{k}={v:.3f}" for k, v in peers.items())
        print(
            f"{name:<44} {used:<7} {'ok' if ok else 'FAIL':<5} {t_nl:8.3f} {peer_txt:<38} "
            f"{best / t_nl:7.2f} {row['pct_of_floor']:6.1f}"
        )
        if not ok:
            print(f"    check errors (x tolerance): {errs}")
        del x, w, b, dy
        if not DRY_RUN:
            torch.cuda.empty_cache()
    out = {
        "device": dev, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "quick": args.quick, "hbm_bytes_per_s": HBM_BYTES_PER_S, "seconds": time.time() - t_start, "rows": rows,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}; {failed} case(s) failed the correctness check; {time.time() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
