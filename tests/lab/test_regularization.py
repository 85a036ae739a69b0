"""``normlab regularization``: the reduced training set, the arms' networks, the --quick run's data (accuracies,
gap, the BN noise), the summary and table over seeds."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import run_quick
from torch import nn

from normlab.lab import data as D
from normlab.lab import runner
from normlab.lab.experiments.regularization import (
    PAPER,
    Regularization,
    RegularizationConfig,
    arm_names,
    arm_spec,
    format_table,
    network,
    subset,
    summarize,
)
from normlab.lab.rundir import RunFolder

EXP = Regularization()


def test_arms_are_the_issue_list_and_their_specs():
    cfg = RegularizationConfig()
    assert arm_names(cfg) == ("plain", "drop0.5", "drop0.2", "bn", "bn+drop0.2", "bn+drop0.5")
    assert [arm_spec(a) for a in arm_names(cfg)] == [("none", 0.0), ("none", 0.5), ("none", 0.2), ("batch", 0.0),
                                                     ("batch", 0.2), ("batch", 0.5)]
    assert arm_names(RegularizationConfig(dropouts=(0.1,))) == ("plain", "drop0.1", "bn", "bn+drop0.1")


def test_networks_share_initial_weights_and_put_dropout_after_each_hidden_activation():
    cfg = RegularizationConfig(seed=3)
    nets = {a: network(a, cfg) for a in arm_names(cfg)}
    weights = {a: [m.weight for m in n if isinstance(m, nn.Linear)] for a, n in nets.items()}
    for a in nets:
        assert all(torch.equal(w, w0) for w, w0 in zip(weights[a], weights["plain"])), a
        norm, rate = arm_spec(a)
        mods = list(nets[a])
        drops = [i for i, m in enumerate(mods) if isinstance(m, nn.Dropout)]
        assert [mods[i].p for i in drops] == [rate] * 3 if rate else not drops
        # each dropout follows the block's activation (fused into BN for the BN arms) and precedes a Linear
        for i in drops:
            assert isinstance(mods[i - 1], nn.BatchNorm1d if norm == "batch" else nn.ReLU)
            assert isinstance(mods[i + 1], nn.Linear)
        hidden = [m for m in mods if isinstance(m, nn.Linear)][:-1]
        assert all((m.bias is None) == (norm == "batch") for m in hidden)  # BN's beta replaces the bias
    other = network("plain", RegularizationConfig(seed=4))
    assert not torch.equal(next(other.parameters()), weights["plain"][0])  # the seed decides the weights


def test_subset_is_seeded_and_keeps_images_with_their_labels():
    rng = np.random.default_rng(0)
    ds = D.MNIST(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50, dtype=np.uint8),
                 np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8), "files", "/x")
    a, b, c = subset(ds, 20, 0), subset(ds, 20, 0), subset(ds, 20, 1)
    assert len(a.train_labels) == 20 and np.array_equal(a.train_images, b.train_images)
    assert not np.array_equal(a.train_images, c.train_images)
    rows = [int(np.flatnonzero((ds.train_images == img).all(axis=(1, 2)))[0]) for img in a.train_images]
    assert rows == sorted(set(rows)) and np.array_equal(ds.train_labels[rows], a.train_labels)
    assert a.test_images is ds.test_images
    with pytest.raises(ValueError, match="train_size must be at most the 50 training images of files data, got 51"):
        subset(ds, 51, 0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"train_size": 50}, "train_size must be >= batch_size"),
    ({"dropouts": (0.5, 0.5)}, "dropouts must be distinct rates in (0, 1)"),
    ({"dropouts": (1.0,)}, "dropouts must be distinct rates in (0, 1)"),
    ({"noise_batch_sizes": (1, 4)}, "noise_batch_sizes must be in [2, train_size]"),
    ({"noise_example": 5000}, "noise_example must be in [0, train_size)"),
    ({"placement": "inside"}, "placement must be one of"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RegularizationConfig(**kwargs).validate()


def test_quick_run_writes_accuracies_gap_and_the_bn_noise(real_dir, tmp_path):
    out = tmp_path / "quick"
    meta = run_quick("regularization", real_dir, out)
    cfg = meta["config"]
    assert meta["data"]["train"] == cfg["train_size"] == 5000  # the reduced training set, recorded
    run = RunFolder(out)
    records, summary = run.records(), run.summary()
    arms = arm_names(RegularizationConfig(dropouts=tuple(cfg["dropouts"])))
    bn_arms = [a for a in arms if arm_spec(a)[0] == "batch"]
    last = records[-1]
    for r in records:
        for a in arms:
            v = r[a]
            assert 0 <= v["train_acc"] <= 1 and 0 <= v["test_acc"] <= 1
            assert v["gap"] == v["train_acc"] - v["test_acc"]
            noise = sorted(int(k[7:]) for k in v if k.startswith("noise_m"))
            # the noise: BN arms only, at init and at the last step
            assert noise == (list(cfg["noise_batch_sizes"]) if a in bn_arms and r["step"] in (0, cfg["steps"])
                             else [])
    # same initial weights: at step 0 (eval mode, no dropout) the no-BN arms are one network, the BN arms another,
    # and the BN arms' noise is the same
    assert len({json.dumps(records[0][a], sort_keys=True) for a in arms if a not in bn_arms}) == 1
    assert len({json.dumps(records[0][a], sort_keys=True) for a in bn_arms}) == 1
    for a in bn_arms:
        for rec in (records[0], last):
            s = [rec[a][f"noise_m{m}"] for m in cfg["noise_batch_sizes"]]
            assert s[0] <= 1.0 + 1e-9  # at m = 2 every normalized value is about ±1
            assert all(x > y for x, y in zip(s[1:], s[2:]))  # from m = 4 on, larger batches move it less
            scaled = [x * math.sqrt(m) for x, m in zip(s, cfg["noise_batch_sizes"]) if m >= 16]
            assert max(scaled) < 1.5 * min(scaled)  # about 1/sqrt(m)
    # learning happened: every arm beats chance by far, BN trains faster than the plain network at equal steps
    assert all(last[a]["test_acc"] > 0.5 for a in arms)
    assert last["bn"]["train_acc"] > last["plain"]["train_acc"]
    # the summary is the records' last values; the table prints them beside the published numbers
    for a in arms:
        assert summary["final"][a]["gap"]["mean"] == last[a]["gap"]
        assert summary["best_test_acc"][a]["mean"] == max(r[a]["test_acc"] for r in records)
    assert summary["noise"]["bn"]["trained"]["128"]["mean"] == last["bn"]["noise_m128"]
    table = run.table_path.read_text()
    for a in arms:
        assert f"| {a} " in table
    for a, v in PAPER.items():
        assert f"{v:.3f}" in table, a
    assert re.search(rf"\| 128 +\| +{records[0]['bn']['noise_m128']:.3f} +\|", table)  # m, bn at init


def test_resume_after_ctrl_c_equals_uninterrupted_noise_at_the_last_step_included(real_dir, tmp_path, monkeypatch):
    cfg = RegularizationConfig(steps=40, eval_every=20, seeds=1, train_size=300, noise_batch_sizes=(2, 8),
                               noise_draws=8, workers=1, device="cpu", data_dir=str(real_dir))
    quiet = dict(progress=False, log=lambda m: None)
    whole = runner.run(EXP, cfg, out=tmp_path / "whole", **quiet)
    indices = D.DataOrder.indices

    def interrupt_at_30(self, step):  # Ctrl-C in the middle of the last evaluation interval
        if step == 30:
            raise KeyboardInterrupt
        return indices(self, step)

    monkeypatch.setattr(D.DataOrder, "indices", interrupt_at_30)
    with pytest.raises(KeyboardInterrupt):
        runner.run(EXP, cfg, out=tmp_path / "resumed", **quiet)
    monkeypatch.setattr(D.DataOrder, "indices", indices)
    runner.run(EXP, cfg, out=tmp_path / "resumed", resume=True, **quiet)
    metrics = [(tmp_path / n / "metrics.jsonl").read_bytes() for n in ("whole", "resumed")]
    assert metrics[0] == metrics[1]
    records = RunFolder(tmp_path / "whole").records()
    assert "noise_m8" in records[-1]["bn"] and "noise_m8" not in records[1]["bn"]
    assert whole["noise"]["bn"]["trained"]["8"]["mean"] == records[-1]["bn"]["noise_m8"]


def _records(seeds: int) -> list[dict]:
    """Synthetic metrics: arm a, seed s has train acc 0.9 + 0.01 s and test acc 0.8 + 0.01 s + 0.02 bn."""
    cfg = RegularizationConfig(seeds=seeds, noise_batch_sizes=(2, 4))
    out = []
    for step in (0, cfg.steps):
        rec = {"step": step}
        for s in range(seeds):
            for a in arm_names(cfg):
                key = a if seeds == 1 else f"{a}/s{s}"
                train, test = 0.9 + 0.01 * s, 0.8 + 0.01 * s + 0.02 * a.startswith("bn") - 0.001 * ("+" in a)
                rec[key] = {"train_loss": None, "test_loss": 1.0, "test_acc": test, "train_acc": train,
                            "gap": train - test}
                if a.startswith("bn"):
                    rec[key].update({"noise_m2": 0.7 + 0.1 * s, "noise_m4": 0.5})
        out.append(rec)
    return out


def test_summary_and_table_over_seeds():
    cfg = RegularizationConfig(seeds=3, noise_batch_sizes=(2, 4))
    summary = summarize(_records(3), cfg)
    f = summary["final"]["bn"]
    assert f["test_acc"]["mean"] == pytest.approx(0.83) and f["test_acc"]["std"] == pytest.approx(0.01)
    assert f["gap"]["mean"] == pytest.approx(0.08) and f["gap"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert summary["noise"]["bn"]["init"]["2"]["std"] == pytest.approx(0.1)
    assert set(summary["noise"]) == {"bn", "bn+drop0.2", "bn+drop0.5"}
    table = format_table({**summary, "config": {"train_size": 5000, "noise_draws": 9}})
    assert "0.8300 ± 0.0100" in table and "| 2 " in table and "0.800 ± 0.100" in table
    assert "Best final test accuracy: **bn** (0.8300)." in table
    assert "BN alone against plain: test accuracy 0.8300 vs 0.8100" in table
    assert "gap 0.0800 vs 0.1000: narrower." in table
    assert "- bn+drop0.2 against BN alone: test accuracy 0.8290 vs 0.8300: lower, within seed noise;" in table
    one_seed = RegularizationConfig(seeds=1, noise_batch_sizes=(2, 4))
    one = format_table({**summarize(_records(1), one_seed), "config": {}})
    assert "±" not in one.split("\n\n")[0]
