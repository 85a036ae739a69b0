"""Where one small training step's time goes: torch.nn against normlab.nn tier by tier, on the CPU.

For ``BatchNorm1d(100)`` on a (60, 100) batch (the MNIST network's shape), one torch thread, prints the median
microseconds of: torch.nn's whole step; normlab.nn's whole step; the backend's forward (running update included)
and backward called directly; and normlab.nn's step with the backend stubbed out (module, functional, autograd
Function and engine alone).

    python benchmarks/tiers.py [--steps 3000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch

import normlab.nn as nl
from normlab import backend, spec


def _median_us(fn, steps: int) -> float:
    for _ in range(100):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, dy = torch.randn(60, 100), torch.randn(60, 100)
    xr = x.clone().requires_grad_()
    ours, theirs = nl.BatchNorm1d(100), torch.nn.BatchNorm1d(100)
    call = spec.call("batch", tuple(x.shape), ours.eps)
    impl = backend.select(x, call.plan)
    w, b = ours.weight.detach(), ours.bias.detach()
    running = spec.Running(ours.running_mean, ours.running_var, ours.momentum, ours.num_batches_tracked,
                           ours.num_skipped_updates)
    _, mean, rstd, _ = impl.forward(x, w, b, call)
    result = {
        "torch.nn step": _median_us(lambda: theirs(xr).backward(dy), args.steps),
        "normlab.nn step": _median_us(lambda: ours(xr).backward(dy), args.steps),
        "backend forward + update": _median_us(lambda: impl.forward(x, w, b, call, None, running), args.steps),
        "backend backward": _median_us(lambda: impl.backward(dy, x, w, b, mean, rstd, call), args.steps),
    }
    stub = types.SimpleNamespace(  # ready tensors: what is left is the layers around the backend
        forward=lambda *a, **k: (torch.empty_like(x), mean, rstd, mean),
        backward=lambda *a, **k: (torch.empty_like(x), w, b),
    )
    select, backend.select = backend.select, lambda *a: stub
    try:
        result["normlab.nn step, backend stubbed"] = _median_us(lambda: ours(xr).backward(dy), args.steps)
    finally:
        backend.select = select
    print(f"backend: {impl.__name__}")
    for name, us in result.items():
        print(f"{name:36s} {us:8.1f} µs")


if __name__ == "__main__":
    main()
