"""``normlab batch-size``: the arms (one data order split into smaller SGD steps, shared initial weights, linear
learning-rate scaling, ghost BN's virtual batches, batch renorm's schedule), the summary and table, and the --quick
run on the real data."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_quick

from normlab import nn as nl
from normlab.lab import data as D
from normlab.lab.experiment import DeviceData, TorchArm
from normlab.lab.experiments import batchsize as B
from normlab.lab.rundir import RunFolder

EXP = B.BatchSize()


# ---------------------------------------------------------------------------------------------------------------
# one order, smaller SGD steps


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    return DeviceData(x, torch.randint(0, 10, (n,), generator=g), x[:4], torch.zeros(4, dtype=torch.long))


def test_split_takes_each_batch_as_consecutive_smaller_sgd_steps():
    data, order = _data(), D.DataOrder(24, 8, seed=3)
    cfg = B.BatchSizeConfig(cnn_channels=(4,))
    net = B.network("batch-b2", cfg)
    twin = B.network("batch-b2", cfg)
    arm = TorchArm("a", net, data, order, 0, "cpu", lr=0.05, split=4)
    loss = arm.train(0, 2)  # two batches of 8: eight SGD steps of 2
    opt = torch.optim.SGD(twin.parameters(), lr=0.05)
    losses = []
    for step in range(2):
        for part in order.indices(step).reshape(4, 2):
            out = torch.nn.functional.cross_entropy(twin(data.train_x[part]), data.train_y[part])
            opt.zero_grad()
            out.backward()
            opt.step()
            losses.append(out.item())
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # the same float32 operations in the same order
    assert arm.step == 2 and loss == pytest.approx(sum(losses) / 8, rel=1e-6)
    assert int(net[1].num_batches_tracked) == 8  # BN saw eight batches of two
    with pytest.raises(ValueError, match="split must be >= 1 and divide the order's batch size 8, got 3"):
        TorchArm("a", net, data, order, 0, "cpu", split=3)


# ---------------------------------------------------------------------------------------------------------------
# the arms


def test_arms_are_batch_major_and_every_norm_at_every_size():
    cfg = B.BatchSizeConfig()
    arms = EXP.arms(cfg)
    assert len(arms) == 36 and arms[:6] == tuple(f"{n}-b2" for n in B.NORMS)
    assert {B.parse_arm(a) for a in arms} == {(n, b) for n in B.NORMS for b in (2, 4, 8, 16, 32, 64)}
    assert B.parse_arm("renorm-b16/s4") == ("renorm", 16)
    assert EXP.label("ghost-b4/s1") == "ghost BN b=4 s1"


def test_arms_build_their_norm_share_initial_weights_and_scale_the_learning_rate(real_dir):
    ds = D.load_mnist(real_dir, log=lambda m: None)
    cfg = B.BatchSizeConfig(seed=5)
    arms = {a: EXP.build_arm(a, cfg, ds, "cpu") for a in ("batch-b2", "batch-b64", "ghost-b4", "renorm-b8",
                                                           "group-b2", "group-b32", "layer-b4", "instance-b4")}
    kinds = {a: [type(m) for m in arm.net if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                 or isinstance(m, torch.nn.GroupNorm)] for a, arm in arms.items()}
    assert kinds["batch-b2"] == [nl.BatchNorm2d] * 2 and kinds["renorm-b8"] == [nl.BatchRenorm2d] * 2
    assert kinds["group-b2"] == [nl.GroupNorm] * 2 and kinds["instance-b4"] == [nl.InstanceNorm2d] * 2
    assert [m.num_groups for m in arms["group-b2"].net if isinstance(m, nl.GroupNorm)] == [4, 4]
    assert [m.num_groups for m in arms["layer-b4"].net if isinstance(m, nl.GroupNorm)] == [1, 1]
    ghost = [m for m in arms["ghost-b4"].net if isinstance(m, nl.BatchNorm2d)]
    assert [m.virtual_batch_size for m in ghost] == [4, 4]
    assert all(m.virtual_batch_size is None for m in arms["batch-b2"].net if isinstance(m, nl.BatchNorm2d))
    assert [m.momentum for m in arms["renorm-b8"].net if isinstance(m, nl.BatchRenorm2d)] == [0.01, 0.01]
    # the same initial conv weights across batch sizes of a norm, and across the batch-type norms
    for a in ("batch-b64", "ghost-b4", "renorm-b8"):
        assert torch.equal(arms[a].net[0].weight, arms["batch-b2"].net[0].weight), a
    assert torch.equal(arms["group-b2"].net[3].weight, arms["group-b32"].net[3].weight)
    assert arms["group-b2"].net[0].bias is not None and arms["batch-b2"].net[0].bias is None
    other = EXP.build_arm("batch-b2", B.BatchSizeConfig(seed=6), ds, "cpu")
    assert not torch.equal(other.net[0].weight, arms["batch-b2"].net[0].weight)
    # SGD steps of b images (ghost BN: of 64), learning rate lr * b / 32
    expect = {"batch-b2": (32, 0.02 / 16), "batch-b64": (1, 0.04), "ghost-b4": (1, 0.04), "renorm-b8": (8, 0.005),
              "group-b32": (2, 0.02)}
    for a, (split, lr) in expect.items():
        assert arms[a].split == split, a
        assert arms[a].opt.param_groups[0]["lr"] == pytest.approx(lr) and arms[a].opt.param_groups[0]["momentum"] == 0.9
        assert arms[a].order.batch_size == 64 and arms[a].data.train_x.shape == (6400, 1, 28, 28)


def test_renorm_starts_as_batch_norm_and_reaches_its_limits_at_half_the_run(real_dir):
    cfg = B.BatchSizeConfig(steps=160)
    limits = [B.renorm_limits(s, cfg) for s in range(cfg.steps + 1)]
    assert limits[:10] == [(1.0, 0.0)] * 10  # the paper's 5k of 80k: 1/16 of the run
    assert limits[10] == (1.0, 0.0) and limits[11] > limits[10]
    assert limits[30] == (pytest.approx(1.0 + 2.0 * 20 / 70), 2.5)
    assert limits[50][1] == 5.0 and limits[49][1] < 5.0  # dmax's ramp: a quarter of the run
    assert limits[80:] == [(3.0, 5.0)] * 81
    assert all(a <= b for a, b in zip(limits, limits[1:]))
    ds = D.load_mnist(real_dir, log=lambda m: None)
    quick = B.BatchSizeConfig(steps=32, batch_size=8, batch_sizes=(2, 8), train_images=64)
    arm = EXP.build_arm("renorm-b2", quick, ds, "cpu")
    for end in (1, 2, 5):
        arm.train(arm.step, end)
        expect = B.renorm_limits(end - 1, quick)  # set before the last step trained
        assert [(float(m.rmax), float(m.dmax)) for m in arm.net if isinstance(m, nl.BatchRenorm2d)] == [
            pytest.approx(expect)] * 2
    assert int(arm.net[0 if isinstance(arm.net[0], nl.BatchRenorm2d) else 1].num_batches_tracked) == 5 * 4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_sizes": (2, 3)}, "batch_sizes must be distinct sizes >= 2 that divide batch_size=64"),
    ({"batch_sizes": (1, 64)}, "batch_sizes must be distinct sizes >= 2"),
    ({"norms": ("batch", "weird")}, "norms must be distinct names from"),
    ({"groups": 3}, "groups must divide every CNN width (8, 16)"),
    ({"train_images": 32}, "train_images must be >= batch_size=64"),
    ({"momentum": 1.0}, "momentum must be in [0, 1)"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        B.BatchSizeConfig(**kwargs).validate()


# ---------------------------------------------------------------------------------------------------------------
# the --quick run


@pytest.fixture(scope="module")
def quick(real_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("batchsize") / "quick"
    meta = run_quick("batch-size", real_dir, out, "--workers", "1")
    return meta, RunFolder(out)


def test_quick_run_trains_every_arm_on_one_order(quick):
    meta, run = quick
    cfg = EXP.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    records = run.records()
    keys = [k for k in records[0] if k != "step"]
    assert len(keys) == len(cfg.norms) * len(cfg.batch_sizes) * cfg.seeds
    assert all(records[0][k] == {"train_loss": None, "test_loss": None, "test_acc": None} for k in keys)
    for r in records[1:]:
        for k in keys:
            assert 0 < r[k]["train_loss"] < 10 and 0 <= r[k]["test_acc"] <= 1
            assert r[k]["test_acc"] * cfg.test_images == pytest.approx(round(r[k]["test_acc"] * cfg.test_images))
    big = cfg.batch_size
    for s in (0, 1):  # ghost BN with virtual batches of the whole batch is batch norm: the very same numbers
        for r in records:
            assert r[f"ghost-b{big}/s{s}"] == r[f"batch-b{big}/s{s}"]
        assert records[-1][f"ghost-b2/s{s}"] != records[-1][f"batch-b2/s{s}"]
        assert records[-1][f"batch-b2/s{s}"] != records[-1][f"batch-b{big}/s{s}"]
    # learning happened in one epoch of 80 images: every arm beats chance (10%), most by far
    accs = [records[-1][k]["test_acc"] for k in keys]
    assert min(accs) > 0.15 and sum(accs) / len(accs) > 0.3


def test_quick_summary_is_the_last_records_errors(quick):
    meta, run = quick
    records, summary = run.records(), run.summary()
    cfg = meta["config"]
    last = records[-1]
    assert summary["batch_sizes"] == sorted(cfg["batch_sizes"], reverse=True) and summary["epochs"] == 1.0
    for norm in cfg["norms"]:
        for b in cfg["batch_sizes"]:
            errs = [100 * (1 - last[f"{norm}-b{b}/s{s}"]["test_acc"]) for s in (0, 1)]
            mean, std = summary["error"][norm][str(b)]
            assert mean == pytest.approx(sum(errs) / 2) and std == pytest.approx(abs(errs[0] - errs[1]) / 2 ** 0.5)
            steps = cfg["train_images"] // (cfg["batch_size"] if norm == "ghost" else b)
            assert summary["sgd_steps"][norm][str(b)] == steps
        assert summary["change"][norm][0] == pytest.approx(summary["error"][norm]["2"][0]
                                                            - summary["error"][norm]["8"][0])
    gap = summary["bn_minus_gn"]["2"][0]
    assert gap == pytest.approx(summary["error"]["batch"]["2"][0] - summary["error"]["group"]["2"][0])
    assert json.loads(run.config_path.read_text())["our_choices"][0] == "lr"


def test_quick_table_prints_ours_beside_wu_and_he(quick):
    _, run = quick
    summary, table = run.summary(), run.table_path.read_text()
    assert re.search(r"\| test error \(%\) +\| +b = 8 \| +b = 2 \| +b=2 − b=8 \|", table)
    for norm, label in B.NORM_LABELS.items():
        mean, std = summary["error"][norm]["2"]
        assert re.search(rf"\| ours: {label} .*\| +{mean:.2f} ± {std:.2f} \|", table), norm
    assert re.search(r"\| Wu & He: batch norm +\| +24\.8 \| +34\.7 \|", table)
    assert re.search(r"\| Wu & He: BN − GN +\| +\+0\.8 \| +\+10\.6 \|", table)
    assert "Wu & He: layer norm" not in table  # published at 32 only, not a column of this run
    assert table.count("expected: it") == len(B.NORMS)
