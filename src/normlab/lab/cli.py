"""The ``normlab`` command (also ``python -m normlab``): one subcommand per experiment.

``normlab mnist`` runs the paper's Figure 1 experiment (:mod:`normlab.lab.train`); ``normlab plot RUN`` redraws
a run's figure. A new experiment adds one ``(add_arguments, handler)`` pair to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import normlab

# --quick, the demo: long enough for BN to pull ahead, short enough for well under a minute on two CPU cores.
QUICK = {"steps": 4000, "eval_every": 250}


def _add_mnist(p: argparse.ArgumentParser) -> None:
    from normlab.lab.train import ENGINES, MnistConfig

    d = MnistConfig()
    # Every default is None here so that an explicit flag can be told from a default (for --quick and --resume);
    # the real defaults are MnistConfig's, shown in the help.
    p.add_argument("--steps", type=int, help=f"training steps (default {d.steps:,}; --quick: {QUICK['steps']:,})")
    p.add_argument("--batch-size", type=int, help=f"mini-batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"SGD learning rate (default {d.lr}, our choice)")
    p.add_argument("--init-std", type=float, help=f"std of the Gaussian initial weights (default {d.init_std}, ours)")
    p.add_argument("--eval-every", type=int, help=f"steps between evaluations (default {d.eval_every})")
    p.add_argument("--seed", type=int, help=f"seed of the weights and the data order (default {d.seed})")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda if available, else cpu)")
    p.add_argument("--data-dir", help="folder of the MNIST files (default: $NORMLAB_DATA, else ~/.cache/normlab/mnist)")
    p.add_argument("--out", help="run folder (default: a new one under ./runs)")
    p.add_argument("--standardize", action="store_true", default=None,
                   help="standardize inputs per pixel with training-set mean and std (default: pixels / 255)")
    p.add_argument("--engine", choices=ENGINES, help="torch, or numpy with normlab.reference (default torch)")
    p.add_argument("--threads", type=int, help=f"torch CPU threads per network (default {d.threads})")
    p.add_argument("--workers", type=int, choices=(1, 2),
                   help="processes: 2 trains each network in its own (default on a CPU with 2+ cores), 1 in this one")
    p.add_argument("--quick", action="store_true",
                   help=f"the demo: {QUICK['steps']:,} steps, evaluated every {QUICK['eval_every']}")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, written at each evaluation "
                   "(the steps since it are trained again)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def mnist_config(args: argparse.Namespace):
    """The :class:`~normlab.lab.train.MnistConfig` for parsed ``args``: defaults, then --quick, then a resumed
    run's saved values, then the flags given."""
    from normlab.lab.train import MnistConfig

    values = dataclasses.asdict(MnistConfig())
    if args.quick:
        values.update(QUICK)
    if args.resume:
        saved = json.loads((Path(args.out) / "config.json").read_text())["config"]
        values.update({k: v for k, v in saved.items() if k in values})
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(MnistConfig) if hasattr(args, f.name)}
    values.update({k: v for k, v in given.items() if v is not None})
    return MnistConfig(**values)


def _run_mnist(args: argparse.Namespace) -> int:
    from normlab.lab.train import default_out, run

    if args.resume and not args.out:
        raise SystemExit("normlab mnist: --resume needs --out RUN_FOLDER (the run to continue)")
    if args.resume and not (Path(args.out) / "config.json").is_file():
        raise SystemExit(f"normlab mnist: --resume: {args.out} holds no run (no config.json)")
    cfg = mnist_config(args)
    out = Path(args.out) if args.out else default_out(cfg)
    try:
        run(cfg, out=out, resume=args.resume, progress=False if args.no_progress else None)
    except KeyboardInterrupt:
        print(f"\nnormlab: interrupted; continue from the last evaluation with: normlab mnist --resume --out {out}",
              file=sys.stderr)
        return 130
    return 0


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by `normlab mnist`")
    p.add_argument("--out", help="image path (default: RUN/figure1.png)")


def _run_plot(args: argparse.Namespace) -> int:
    from normlab.lab.plots import plot_figure1

    print(plot_figure1(args.run, args.out))
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "mnist": ("reproduce the paper's MNIST experiment (Figure 1)", _add_mnist, _run_mnist),
    "plot": ("redraw figure1.png from a run folder", _add_plot, _run_plot),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``normlab`` argument parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="normlab", description="normlab's lab: experiments from the BN paper.")
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``normlab`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"normlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
