"""Figure 1's summary and table computed from metrics records, the generic metrics helpers, and the NumPy
engine's loss."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from normlab.diagnostics import percentiles
from normlab.lab.experiment import mean_std
from normlab.lab.experiments.mnist import MnistConfig, format_table, summarize
from normlab.lab.metrics import markdown_table, softmax_cross_entropy, steps_to_reach


def _records(accs_plain, accs_bn, every=5000):
    recs = []
    for i, (a, b) in enumerate(zip(accs_plain, accs_bn)):
        recs.append({"step": i * every,
                     "plain": {"test_acc": a, "p15": -i, "p50": 0.5 * i, "p85": i + 1.0},
                     "bn": {"test_acc": b, "p15": -1.0, "p50": 0.0, "p85": 1.0}})
    return recs


def test_summary_reads_accuracy_and_steps_to_threshold():
    plain = [0.1, 0.90, 0.95, 0.96, 0.96, 0.965, 0.966, 0.967, 0.968, 0.969, 0.970]
    bn = [0.1, 0.96, 0.97, 0.975, 0.976, 0.977, 0.978, 0.979, 0.98, 0.981, 0.982]
    s = summarize(_records(plain, bn))
    assert s["final_step"] == 50_000 and s["final"] == {"plain": 0.970, "bn": 0.982}
    assert s["acc_at"]["5000"] == {"plain": 0.90, "bn": 0.96}
    assert s["acc_at"]["20000"] == {"plain": 0.96, "bn": 0.976}
    assert s["steps_to"]["0.95"] == {"plain": 10_000, "bn": 5_000}
    assert s["steps_to"]["0.97"] == {"plain": 50_000, "bn": 10_000}
    # the plain network's percentiles drift (step 0 is left out), the BN one's do not
    assert s["percentiles"]["plain"]["p50_range"] == pytest.approx(4.5)
    assert s["percentiles"]["bn"]["p50_range"] == 0.0
    table = format_table(s)
    assert "0.9700" in table.splitlines()[5] and "≈ 0.96-0.97 / ≈ 0.98" in table.splitlines()[5]  # the 50k row
    assert "10,000" in table and "5,000" in table


def test_short_run_table_says_not_reached():
    s = summarize(_records([0.1, 0.5, 0.6], [0.1, 0.9, 0.96], every=100))
    assert steps_to_reach(_records([0.1, 0.5], [0.1, 0.9]), "bn", 0.95) is None
    table = format_table(s)
    assert "test acc @ 200 (final)" in table and "> 200" in table and "5k" not in table
    # the paper's one number stays in the table, with the reason ours is missing
    assert "| test acc @ 50k steps" in table and "(run ends at 200)" in table and "≈ 0.98" in table
    assert "Median range" in table and "15-85 width range" in table  # the percentile rows explained in words


def test_percentiles_match_numpy_and_are_ordered():
    v = np.random.default_rng(0).normal(size=10_000)
    p = percentiles(v)
    assert p["p15"] < p["p50"] < p["p85"]
    assert p["p50"] == pytest.approx(np.median(v))
    assert p["p85"] == pytest.approx(torch.quantile(torch.from_numpy(v), 0.85).item())


def test_softmax_cross_entropy_matches_torch():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(7, 10)) * 30, rng.integers(0, 10, 7)  # large logits: no overflow
    loss, grad = softmax_cross_entropy(logits, labels)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_summary_over_seeds_gives_mean_and_std():
    cfg = MnistConfig(seeds=2)
    recs = []
    for i, (a, b) in enumerate([(0.1, 0.1), (0.9, 0.96), (0.95, 0.98)]):
        row = {"p15": -1.0, "p50": 0.0, "p85": 1.0}
        recs.append({"step": 100 * i, "plain/s0": {"test_acc": a, **row}, "bn/s0": {"test_acc": b, **row},
                     "plain/s1": {"test_acc": a - 0.02, **row}, "bn/s1": {"test_acc": b, **row}})
    s = summarize(recs, cfg)
    assert s["final"]["plain"] == pytest.approx(0.94) and s["final_std"]["plain"] == pytest.approx(0.02 / 2 ** 0.5)
    assert s["final_std"]["bn"] == 0.0
    assert s["steps_to"]["0.95"] == {"plain": None, "bn": 100.0}  # one seed never reached it: no mean
    assert "0.9400 ± 0.0141" in format_table(s)


def test_mean_std_and_markdown_table():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert mean_std([5]) == (5.0, 0.0) and mean_std([1.0, None]) == (None, None)
    lines = markdown_table(("", "a"), [("row", "1.5")]).splitlines()
    assert lines == ["|     |   a |", "|-----|----:|", "| row | 1.5 |"]
    # a pipe inside a cell (test-stats' "|μ−μ_pop|") is written \|: GitHub-flavoured Markdown cuts a row only at
    # unescaped pipes, so every row keeps the header's columns (the report's rendering: tests/lab/test_report.py)
    lines = markdown_table(("x", "L1 |μ−μ_pop|/σ_pop"), [("a|b", "|")]).splitlines()
    assert lines == ["| x    | L1 \\|μ−μ_pop\\|/σ_pop |",
                     "|------|---------------------:|",
                     "| a\\|b |                   \\| |"]
    assert [len(re.split(r"(?<!\\)\|", line)) for line in lines] == [4, 4, 4]
