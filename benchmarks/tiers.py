"""Where one small training step's time goes: torch.nn against normlab.nn tier by tier, on the CPU.

For ``BatchNorm1d(100)`` on a (60, 100) batch (the MNIST network's shape), one torch thread, prints the median
microseconds (thread CPU time, so that other load on the machine counts less) of:

- torch.nn's whole step, and ATen's ``batch_norm`` step called directly (no module: the floor);
- normlab.nn's whole step as ``NORMLAB_BACKEND=auto`` runs it (the native kernels, at this size), the same path's
  ``normlab.native.norm`` step called directly (no module, no functional checks);
- the same two for ATen's kernels on shifted input (``NORMLAB_BACKEND=aten``, the path where native is not built);
- normlab.nn's step on the numba loops (``NORMLAB_BACKEND=numba``), the loops' forward (with the running update) and
  backward called directly, and that step with the loops stubbed out (module, functional, autograd Function and
  engine alone).

    python benchmarks/tiers.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import torch

import normlab.nn as nl
from normlab import aten_ops, backend, native, numba_ops, spec


def _median_us(fn, steps: int, env: str = "auto") -> float:
    os.environ["NORMLAB_BACKEND"] = env
    for _ in range(100):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not native.available():
        raise SystemExit("the native kernels could not be built (see the warning above)")
    x, dy = torch.randn(60, 100), torch.randn(60, 100)
    xr = x.clone().requires_grad_()
    ours, theirs = nl.BatchNorm1d(100), torch.nn.BatchNorm1d(100)
    call = spec.call("batch", tuple(x.shape), ours.eps)
    w, b = ours.weight.detach(), ours.bias.detach()
    wr, br = ours.weight, ours.bias
    running = spec.Running(ours.running_mean, ours.running_var, ours.momentum, ours.num_batches_tracked,
                           ours.num_skipped_updates)
    rm, rv = theirs.running_mean, theirs.running_var
    _, mean, rstd, _ = numba_ops.forward(x, w, b, call)
    s = args.steps
    result = {
        "torch.nn step": _median_us(lambda: theirs(xr).backward(dy), s),
        "ATen batch_norm step (no module)": _median_us(
            lambda: torch.batch_norm(xr, wr, br, rm, rv, True, 0.1, 1e-5, False).backward(dy), s),
        "normlab.nn step (auto: native)": _median_us(lambda: ours(xr).backward(dy), s),
        "native.norm step (no module)": _median_us(
            lambda: native.norm(xr, wr, br, call, None, running).backward(dy), s),
        "normlab.nn step (ATen, shifted)": _median_us(lambda: ours(xr).backward(dy), s, "aten"),
        "aten_ops.norm step (no module)": _median_us(
            lambda: aten_ops.norm(xr, wr, br, call, None, running).backward(dy), s),
        "normlab.nn step (numba)": _median_us(lambda: ours(xr).backward(dy), s, "numba"),
        "numba forward + update": _median_us(lambda: numba_ops.forward(x, w, b, call, None, running), s),
        "numba backward": _median_us(lambda: numba_ops.backward(dy, x, w, b, mean, rstd, call), s),
    }
    stub = types.SimpleNamespace(  # ready tensors: what is left is the layers around the loops
        forward=lambda *a, **k: (torch.empty_like(x), mean, rstd, mean),
        backward=lambda *a, **k: (torch.empty_like(x), w, b),
    )
    select, backend.select = backend.select, lambda *a: stub
    try:
        result["normlab.nn step (numba), loops stubbed"] = _median_us(lambda: ours(xr).backward(dy), s, "numba")
    finally:
        backend.select = select
        os.environ.pop("NORMLAB_BACKEND")
    for name, us in result.items():
        print(f"{name:40s} {us:8.1f} µs")


if __name__ == "__main__":
    main()
