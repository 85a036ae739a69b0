"""Where one CPU path beats another, the tables behind ``normlab.native.pays`` and ``normlab.aten_ops.pays``.

One training step (forward + backward) or eval forward (under ``no_grad``; for layer and group norm, which have no
running statistics, the forward with the input's own statistics) through ``normlab.functional`` with two values of
``NORMLAB_BACKEND`` interleaved (``--paths A,B``, default ``native,numba``), over input sizes from 4K to 4M values
and, for the kinds with spatial dims, over the spatial extent R; each cell is the ratio A / B of the two minimum
times (thread CPU time with one thread, robust to other load on the machine; wall time with more, as the other
threads' work counts there).

    python benchmarks/crossover.py [--paths native,numba] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import normlab.functional as F


def _batch(x, w, b, rm, rv, training):
    return F.batch_norm(x, rm, rv, w, b, training)


def _instance(x, w, b, rm, rv, training):
    return F.instance_norm(x, None if training else rm, None if training else rv, w, b, use_input_stats=training)


def _layer(x, w, b, rm, rv, training):
    return F.layer_norm(x, x.shape[-1:], w, b)


def _group(x, w, b, rm, rv, training):
    return F.group_norm(x, 8, w, b)


# (label, norm, channels, spatial shape or None for (N, C), modes)
CASES = [
    ("batch (N, 256)", _batch, 256, None, ("train", "eval")),
    *[(f"batch (N, 64, {s}, {s})", _batch, 64, (s, s), ("train", "eval")) for s in (7, 14, 28, 56)],
    *[(f"instance (N, 64, {s}, {s})", _instance, 64, (s, s), ("train", "eval")) for s in (8, 16, 32)],
    ("layer (N, 768)", _layer, 768, None, ("train", "eval")),
    *[(f"group 8 of (N, 64, {s}, {s})", _group, 64, (s, s), ("train", "eval")) for s in (8, 32)],
]


def _min_time(fns: dict, reps: int) -> dict:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for f in fns.values():
        for _ in range(3):
            f()
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = clock()
            f()
            best[k] = min(best[k], clock() - t)
    return best


def _cell(norm, shape, c, mode, reps, paths) -> str:
    x = torch.randn(shape, requires_grad=(mode == "train"))
    dy = torch.randn(shape)
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)

    def run(backend):
        os.environ["NORMLAB_BACKEND"] = backend
        if mode == "train":
            norm(x, w, b, rm, rv, True).backward(dy)
        else:
            with torch.no_grad():
                norm(x, w, b, rm, rv, False)

    first, second = paths
    t = _min_time({first: lambda: run(first), second: lambda: run(second)}, reps)
    return f"{t[first] / t[second]:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default="native,numba", help="two NORMLAB_BACKEND values A,B; cells are A / B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="two sizes, few repeats, few rows: a check that it runs")
    args = ap.parse_args()
    paths = tuple(args.paths.split(","))
    torch.set_num_threads(args.threads)
    sizes = [1 << 12, 1 << 16] if args.quick else [1 << k for k in range(12, 23, 2)]
    cases = CASES[:2] if args.quick else CASES
    print(f"| case | mode | {' | '.join(f'{n:,}' for n in sizes)} |")
    print("|---|---|" + "---|" * len(sizes))
    for label, norm, c, spatial, modes in cases:
        for mode in modes:
            cells = []
            for n in sizes:
                per_sample = c * (1 if spatial is None else spatial[0] * spatial[1])
                shape = (max(n // per_sample, 2), c, *(spatial or ()))
                reps = 3 if args.quick else max(5, min(200, (1 << 24) // (shape[0] * per_sample)))
                cells.append(_cell(norm, shape, c, mode, reps, paths))
            print(f"| {label} | {mode} | {' | '.join(cells)} |", flush=True)
    print(f"\nCells: time with NORMLAB_BACKEND={paths[0]} / time with {paths[1]} (< 1: {paths[0]} is faster), "
          f"{args.threads} thread(s). Columns: values in the input (N = values / (C x spatial), at least 2).")


if __name__ == "__main__":
    main()
