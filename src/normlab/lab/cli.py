"""The ``normlab`` command (also ``python -m normlab``): one subcommand per registered experiment, ``plot`` and
``report``.

Each experiment's flags are generated from its config dataclass (:func:`add_config_flags`): field ``batch_size``
becomes ``--batch-size``, its help is the field's ``metadata["help"]``, booleans get ``--x/--no-x``. Every
experiment also has ``--out``, ``--quick``, ``--resume`` and ``--no-progress``. Errors a user can fix are one line
on stderr (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import typing
from pathlib import Path

import normlab


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _base_type(tp):
    """``int | None`` -> ``(int, False)``; ``tuple[int, ...]`` -> ``(int, True)``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0], True
    if args and typing.get_origin(tp) is not tuple:
        return _base_type(args[0])
    return tp, False


def add_config_flags(p: argparse.ArgumentParser, config: type, quick: dict) -> None:
    """One flag per field of the config dataclass ``config``; every default is None so that a flag given can be
    told from a default (for --quick and --resume); the real default is shown in the help."""
    hints = typing.get_type_hints(config)
    defaults = config()
    for f in dataclasses.fields(config):
        tp, many = _base_type(hints[f.name])
        default = getattr(defaults, f.name)
        shown = [] if default is None else [f"default {_show(default)}"]  # None: the help says what happens
        shown += [f"--quick: {_show(quick[f.name])}"] if f.name in quick else []
        text = f.metadata.get("help", f.name.replace("_", " ")) + (f" ({'; '.join(shown)})" if shown else "")
        kw = {"help": text, "default": None}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        else:
            kw["metavar"] = f.name.upper()
        if tp is bool:
            kw.pop("metavar", None)
            p.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(_flag(f.name), type=tp, nargs="+" if many else None, **kw)


def add_experiment_flags(p: argparse.ArgumentParser, exp) -> None:
    """The config's flags, then the flags every experiment has."""
    add_config_flags(p, exp.config, exp.quick)
    p.add_argument("--out", help="run folder (default: a new one under ./runs)")
    quick = ", ".join(f"{k}={_show(v)}" for k, v in exp.quick.items())
    p.add_argument("--quick", action="store_true", help=f"the demo, well under a minute on two CPU cores ({quick})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, written at each evaluation "
                   "(the steps since it are trained again)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")


def config_from_args(exp, args: argparse.Namespace):
    """The experiment's config for parsed ``args``: defaults, then --quick, then a resumed run's saved values,
    then the flags given."""
    from normlab.lab.rundir import RunFolder

    values = dataclasses.asdict(exp.config())
    if args.quick:
        values.update(exp.quick)
    if args.resume:
        saved = RunFolder(args.out).config()
        values.update({k: tuple(v) if isinstance(values[k], tuple) else v for k, v in saved.items() if k in values})
    for f in dataclasses.fields(exp.config):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return exp.config(**values)


def _short(path: str) -> str:
    """``path`` relative to the working directory when it lies under it (``.venv/bin/normlab``), else absolute."""
    p = Path(path).absolute()
    try:
        rel = p.relative_to(Path.cwd())
    except ValueError:
        return str(p)
    return str(rel) if "/" in str(rel) else f"./{rel}"


def invocation() -> list[str]:
    """The command that runs ``normlab`` from where the user is: ``normlab`` when that is on PATH and is this
    program, else its path (``.venv/bin/normlab``), else ``python -m normlab`` with this interpreter."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "normlab" and Path(argv0).exists():
        found = shutil.which("normlab")
        if found and os.path.realpath(found) == os.path.realpath(argv0):
            return ["normlab"]
        return [_short(argv0)]
    exe = sys.executable
    found = shutil.which("python")
    python = "python" if found and os.path.realpath(found) == os.path.realpath(exe) else _short(exe)
    return [python, "-m", "normlab"]


def _run_experiment(exp, args: argparse.Namespace, argv: list[str]) -> int:
    from normlab.lab.runner import default_out, run

    if args.resume and not args.out:
        raise SystemExit(f"normlab {exp.name}: --resume needs --out RUN_FOLDER (the run to continue)")
    cfg = config_from_args(exp, args)
    cfg.validate()
    out = Path(args.out) if args.out else default_out(exp, cfg)
    try:
        run(exp, cfg, out=out, resume=args.resume, progress=False if args.no_progress else None,
            command=invocation() + argv, quick=args.quick)
    except KeyboardInterrupt:
        hint = shlex.join([*invocation(), exp.name, "--resume", "--out", str(out)])
        print(f"\nnormlab: interrupted; continue from the last evaluation with: {hint}", file=sys.stderr)
        return 130
    return 0


def _add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder written by any `normlab EXPERIMENT`")
    p.add_argument("--out", help="image path; its suffix picks the format (default: the run's figure in RUN)")


def _run_plot(args: argparse.Namespace) -> int:
    from normlab.lab.plots import plot_run

    print(plot_run(args.run, args.out))
    return 0


def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", metavar="RESULTS_DIR", help="folder whose run folders (at any depth) the page shows")
    p.add_argument("--out", help="the HTML file to write (default: RESULTS_DIR/report.html)")


def _run_report(args: argparse.Namespace, argv: list[str]) -> int:
    from normlab.lab.report import write_report

    out, entries = write_report(args.results, args.out, command=shlex.join([*invocation(), *argv]))
    bad = sum(e.error is not None for e in entries)
    note = f" ({bad} of them unreadable: see the messages above and their entries on the page)" if bad else ""
    print(f"normlab report: {len(entries)} run(s){note} -> {out}", file=sys.stderr)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``normlab`` argument parser: one subparser per registered experiment, then ``plot`` and ``report``."""
    from normlab.lab import registry

    parser = argparse.ArgumentParser(prog="normlab", description="normlab's lab: experiments from the BN paper.")
    parser.add_argument("--version", action="version", version=f"normlab {normlab.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, exp in registry.experiments().items():
        p = sub.add_parser(name, help=exp.title, description=exp.title)
        add_experiment_flags(p, exp)
        p.set_defaults(handler=lambda args, argv, exp=exp: _run_experiment(exp, args, argv))
    p = sub.add_parser("plot", help="redraw a run's figure from its folder",
                       description="redraw a run's figure from its folder (the experiment is read from config.json)")
    _add_plot(p)
    p.set_defaults(handler=lambda args, argv: _run_plot(args))
    p = sub.add_parser("report", help="one self-contained HTML page of every run under a folder",
                       description="one self-contained HTML page of every run folder under RESULTS_DIR: figures "
                       "embedded, tables, command, configuration and versions; opens offline in any browser")
    _add_report(p)
    p.set_defaults(handler=_run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``normlab`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args, argv)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"normlab: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"normlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
