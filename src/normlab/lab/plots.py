"""What every experiment's figure shares: the headline note, and saving (atomically, in the format of the suffix).

Each experiment draws its own figure in its ``plot`` hook from the run's records; :func:`plot_run` picks the
experiment from the run's config.json, so ``normlab plot RUN`` redraws any run.
"""

from __future__ import annotations

import os
from pathlib import Path

from normlab.lab import files
from normlab.lab.rundir import RunFolder


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed; kept if the caller already chose one)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def run_note(meta: dict) -> str:
    """What a figure's title must say about the run: a --quick run, the shipped sample instead of MNIST."""
    notes = []
    if meta.get("quick"):
        steps = meta.get("config", {}).get("steps")
        notes.append(f"QUICK RUN ({steps:,} steps), not the full protocol" if steps else "QUICK RUN")
    if meta.get("data", {}).get("source") == "sample":
        notes.append("SHIPPED SAMPLE, NOT MNIST: not the paper's experiment")
    return "   ".join(f"[{n}]" for n in notes)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix; PNG when matplotlib knows none), close it."""
    plt = pyplot()
    path = Path(path)
    fmt = path.suffix[1:].lower()
    fmt = fmt if fmt in fig.canvas.get_supported_filetypes() else "png"
    try:
        files.writable_dir(path.parent, "the figure's folder")
        files.atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the figure of the run in ``run_dir`` (its experiment's, from config.json) to ``out`` (default: the
    experiment's figure name in the run folder); returns the image's path."""
    from normlab.lab import registry

    run = RunFolder(run_dir)
    exp = registry.get(run.experiment())
    records = run.records()
    fig = exp.plot(records, run.meta())
    return save_figure(fig, out if out is not None else run.path / exp.figure_name)
