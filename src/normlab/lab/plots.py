"""Figure 1 of the paper from a run folder's ``metrics.jsonl``: a run writes data, this module only reads it.

(a) test accuracy against training steps, with and without BN; (b) the 15th, 50th and 85th percentiles of one
last-hidden-layer sigmoid's input without BN; (c) the same with BN. Panels (b) and (c) share their y-axis, so
a drift in one and a flat line in the other read as what they are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from normlab.lab.files import atomic_write


def _read(run_dir: Path) -> tuple[list[dict], dict]:
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no records")
    cfg_path = run_dir / "config.json"
    meta = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return records, meta


def plot_figure1(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, dpi: int = 110) -> Path:
    """Draw ``figure1.png`` (or ``out``) from the run folder ``run_dir``; returns the image's path.

    The image's format follows ``out``'s suffix (PNG when it names none matplotlib knows); it is written
    atomically, so concurrent plots of one run never collide and a reader never sees half an image.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op if the caller already chose a backend
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records, meta = _read(run_dir)
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    style = {"plain": ("without BN", "tab:gray", "--"), "bn": ("with BN", "tab:blue", "-")}

    ax = axes[0]
    for v, (label, color, ls) in style.items():
        ax.plot(steps, [r[v]["test_acc"] for r in records], ls, color=color, label=label)
    # The paper's axis starts at 0.7; a short run that has not got there yet gets the whole range.
    ax.set_ylim(0.7 if min(records[-1][v]["test_acc"] for v in style) >= 0.9 else 0.0, 1.0)
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)

    trained = [r for r in records if r["step"] > 0] or records  # step 0 is the untrained network
    ts = [r["step"] for r in trained]
    lo = min(min(r[v]["p15"] for r in trained) for v in style)
    hi = max(max(r[v]["p85"] for r in trained) for v in style)
    pad = 0.05 * (hi - lo or 1.0)
    for ax, (v, (label, color, _)), name in zip(axes[1:], style.items(), ("(b)", "(c)")):
        for key, ls in (("p85", ":"), ("p50", "-"), ("p15", ":")):
            ax.plot(ts, [r[v][key] for r in trained], ls, color=color, label=f"{key[1:]}th pct")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training steps")
        ax.set_ylabel("sigmoid input")
        ax.set_title(f"{name} {label}: 15/50/85th percentiles")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)

    cfg = meta.get("config", {})
    data = meta.get("data", {})
    note = (f"{cfg.get('engine', '?')} engine, {cfg.get('optimizer', '?')} lr={cfg.get('lr', '?')}, "
            f"init std={cfg.get('init_std', '?')}, batch {cfg.get('batch_size', '?')}, seed {cfg.get('seed', '?')}")
    if data.get("source") == "sample":
        note += "   [SHIPPED SAMPLE, NOT MNIST: not the paper's experiment]"
    fig.suptitle(f"MNIST, 784-100-100-100-10 sigmoid network (Ioffe & Szegedy 2015, Fig. 1): {note}", fontsize=9)
    fig.tight_layout()
    path = Path(out) if out is not None else run_dir / "figure1.png"
    fmt = path.suffix[1:].lower()
    fmt = fmt if fmt in fig.canvas.get_supported_filetypes() else "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)
    return path
