"""normlab vs torch.nn forward+backward time on the CPU, float32: prints a table of medians and their ratio.

Usage: python benchmarks/cpu.py [--repeat 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import normlab.nn as nl

CASES = [
    ("BatchNorm2d", (32, 64, 56, 56), False),
    ("BatchNorm2d", (32, 64, 56, 56), True),
    ("BatchNorm1d", (256, 100), False),
]


def _time(layer, x, dy, repeat):
    """Median seconds of one training step (forward + backward) over ``repeat`` runs, after two warm-ups."""
    times = []
    for i in range(repeat + 2):
        xi = x.detach().requires_grad_()
        t0 = time.perf_counter()
        layer(xi).backward(dy)
        t1 = time.perf_counter()
        if i >= 2:
            times.append(t1 - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("NORMLAB_BACKEND", "torch")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'layer':<12} {'shape':<18} {'layout':<14} {'torch ms':>9} {'normlab ms':>11} {'ratio':>6}")
    for name, shape, cl in CASES:
        x = torch.randn(shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        t_torch = _time(getattr(torch.nn, name)(shape[1]), x, dy, args.repeat)
        t_ours = _time(getattr(nl, name)(shape[1]), x, dy, args.repeat)
        layout = "channels_last" if cl else "contiguous"
        rows.append({"layer": name, "shape": shape, "layout": layout, "torch_ms": t_torch * 1e3,
                     "normlab_ms": t_ours * 1e3, "ratio": t_ours / t_torch})
        print(f"{name:<12} {str(shape):<18} {layout:<14} {t_torch * 1e3:9.3f} {t_ours * 1e3:11.3f} "
              f"{t_ours / t_torch:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
