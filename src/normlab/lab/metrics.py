"""What experiments compute from their networks' outputs and their metrics records, in plain NumPy.

A run's ``metrics.jsonl`` holds one record per evaluation, keyed by arm (see :mod:`normlab.lab.experiment`)::

    {"step": 500, "plain": {"train_loss": 2.1, "test_loss": 2.0, "test_acc": 0.41, ...}, "bn": {...}}
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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


def value_at(records: list[dict], step: int, key: str, metric: str = "test_acc"):
    """``metric`` of ``key`` in the record of ``step``; None when no evaluation fell on that step."""
    for r in records:
        if r["step"] == step:
            return r[key][metric]
    return None


def steps_to_reach(records: list[dict], key: str, threshold: float, metric: str = "test_acc") -> int | None:
    """First evaluated step at which ``key``'s ``metric`` is at least ``threshold``; None if never."""
    for r in records:
        if r[key][metric] >= threshold:
            return r["step"]
    return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns (readable printed as well as rendered); the first column left-aligned.
    A ``|`` inside a cell is written ``\\|``, which GitHub and markdown-it read as a literal pipe, not a cell break."""
    cells = [[c.replace("|", "\\|") for c in r] for r in (header, *rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
