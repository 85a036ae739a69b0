"""What the MNIST run measures and reports: sigmoid-input percentiles, the summary, and the printed table.

Everything here works on plain NumPy arrays and on the records of ``metrics.jsonl``, one dict per evaluation::

    {"step": 500,
     "plain": {"train_loss": 2.1, "test_loss": 2.0, "test_acc": 0.41, "p15": -0.3, "p50": 0.1, "p85": 0.4},
     "bn":    {...}}

so the torch and the NumPy engine share it.
"""

from __future__ import annotations

import numpy as np

PERCENTILES = (15, 50, 85)  # Figure 1(b, c): {15, 50, 85}th percentiles of one sigmoid's input
ACC_STEPS = (5_000, 10_000, 20_000, 50_000)
THRESHOLDS = (0.95, 0.97)
# Read off the paper's Figure 1(a) at 50k steps; the paper prints no table, so nothing else is given.
PAPER_AT_50K = {"plain": "0.96-0.97", "bn": "0.98"}
LABELS = {"plain": "without BN", "bn": "with BN"}


def sigmoid_input_percentiles(values: np.ndarray) -> dict[str, float]:
    """The 15th, 50th and 85th percentiles of one unit's sigmoid input over the test set, ``values`` ``(N,)``."""
    qs = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {f"p{p}": float(q) for p, q in zip(PERCENTILES, qs)}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of ``logits`` ``(N, 10)`` whose argmax equals ``labels`` ``(N,)``."""
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of ``logits`` ``(N, C)`` against integer ``labels`` ``(N,)``, and its gradient ``(N, C)``."""
    z = logits - logits.max(axis=1, keepdims=True)  # shift: exp never overflows, softmax unchanged
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -float(logp[np.arange(n), labels].mean())
    grad = np.exp(logp)
    grad[np.arange(n), labels] -= 1.0
    return loss, grad / n


def _acc_at(records: list[dict], step: int, variant: str) -> float | None:
    for r in records:
        if r["step"] == step:
            return r[variant]["test_acc"]
    return None


def steps_to_reach(records: list[dict], variant: str, threshold: float) -> int | None:
    """First evaluated step at which ``variant``'s test accuracy is at least ``threshold``; None if never."""
    for r in records:
        if r[variant]["test_acc"] >= threshold:
            return r["step"]
    return None


def summarize(records: list[dict]) -> dict:
    """The run's headline numbers from its metrics records (sorted by step)."""
    last = records[-1]
    trained = [r for r in records if r["step"] > 0] or records
    out = {"final_step": last["step"], "final": {}, "acc_at": {}, "steps_to": {}, "percentiles": {}}
    for v in LABELS:
        out["final"][v] = last[v]["test_acc"]
        p50 = [r[v]["p50"] for r in trained]
        spread = [r[v]["p85"] - r[v]["p15"] for r in trained]
        out["percentiles"][v] = {
            "first": {k: trained[0][v][k] for k in ("p15", "p50", "p85")},  # first evaluation after training began
            "last": {k: last[v][k] for k in ("p15", "p50", "p85")},
            "p50_range": max(p50) - min(p50),  # how far the median wanders over the run
            "spread_range": max(spread) - min(spread),  # how far the 15-85 width wanders
        }
    for s in ACC_STEPS:
        out["acc_at"][str(s)] = {v: _acc_at(records, s, v) for v in LABELS}
    for t in THRESHOLDS:
        out["steps_to"][f"{t:.2f}"] = {v: steps_to_reach(records, v, t) for v in LABELS}
    return out


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(summary: dict) -> str:
    """The run's table: accuracy at fixed steps, steps to 95%/97%, the paper's values beside ours."""
    rows = [("", "without BN", "with BN", "paper: without / with BN")]
    for s in ACC_STEPS:
        acc = summary["acc_at"][str(s)]
        if s > summary["final_step"]:
            continue
        paper = f"{PAPER_AT_50K['plain']} / {PAPER_AT_50K['bn']}" if s == 50_000 else "-"
        rows.append((f"test acc @ {s // 1000}k steps", _fmt(acc["plain"]), _fmt(acc["bn"]), paper))
    if summary["final_step"] not in ACC_STEPS:
        f = summary["final"]
        rows.append((f"test acc @ {summary['final_step']:,} (final)", _fmt(f["plain"]), _fmt(f["bn"]), "-"))
    never = f"> {summary['final_step']:,}"  # not reached within the run
    for t, reach in summary["steps_to"].items():
        cells = [never if reach[v] is None else f"{reach[v]:,}" for v in ("plain", "bn")]
        rows.append((f"steps to {float(t):.0%}", *cells, "-"))
    for key, name in (("p50_range", "median range"), ("spread_range", "15-85 width range")):
        p = summary["percentiles"]
        rows.append((f"sigmoid input {name}", f"{p['plain'][key]:.3f}", f"{p['bn'][key]:.3f}", "drifts / stable"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
