"""``normlab test-stats`` on the real data: the twin running statistics, the population statistics, batch statistics
at small test batches, the --quick run's files and numbers, and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_quick

from normlab.lab import data as D
from normlab.lab import runner
from normlab.lab.data import DataOrder
from normlab.lab.experiment import TorchArm, device_data
from normlab.lab.experiments import teststats as T
from normlab.lab.report import markdown_html
from normlab.lab.rundir import RunFolder

EXP = T.TestStats()
QUIET = dict(progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def ds(real_dir):
    return D.read_folder(real_dir)


def _arm(cfg, ds, net):
    order = DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
    return TorchArm("bn", net, device_data(ds, "cpu"), order, cfg.seed, "cpu", lr=cfg.lr)


def test_twins_end_where_a_network_trained_with_that_momentum_does(ds):
    # One network with twins for momentum 0.01 and None against networks trained with those momenta themselves,
    # on the same batches from the same weights: momentum changes no weight, and the twins hold those buffers.
    cfg = T.TestStatsConfig(momenta=(0.1, 0.01))
    tracked = _arm(cfg, ds, T.network(cfg))
    alone = {m: _arm(cfg, ds, T.mlp(cfg)) for m in (0.01, None)}
    for m, arm in alone.items():
        for bn in T.bn_layers(arm.net):
            bn.momentum = m
    for arm in (tracked, *alone.values()):
        arm.train(0, 25)
    for k, m in enumerate((0.01, None)):
        other = alone[m].net
        for (name, p), q in zip(tracked.net.net.named_parameters(), other.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
        for (mean, var), bn in zip(tracked.net.twins.stats(k), T.bn_layers(other)):
            torch.testing.assert_close(mean, bn.running_mean, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(var, bn.running_var, rtol=1e-6, atol=1e-7)
    # the network's own buffers are momentum 0.1's, and differ from the twins'
    own = T.bn_layers(tracked.net.net)[0].running_mean
    assert not torch.allclose(own, tracked.net.twins.stats(0)[0][0])
    # eval mode folds nothing into the twins
    before = tracked.net.twins.stats(1)
    tracked.evaluate()
    for (a, b), (c, d) in zip(before, tracked.net.twins.stats(1)):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_population_statistics_by_hand_on_the_first_layer(ds):
    # The first BN layer's input does not depend on the batch: x @ W1.T over the training set, in float64.
    cfg = T.TestStatsConfig(steps=10)
    arm = T.TestStats().build_arm("bn", cfg, ds, "cpu")
    arm.train(0, 10)
    measure = arm.measure
    measure.net.load_state_dict(arm.net.net.state_dict())
    pop = measure.population(arm)
    w1 = arm.net.net[0].weight.detach().double()
    rows = arm.order.segment(0, arm.order.per_epoch)
    z = arm.data.train_x[torch.from_numpy(rows.reshape(-1))].double() @ w1.T  # (n, 100), epoch 0's rows
    m = cfg.batch_size
    zb = z.reshape(len(rows), m, -1)
    exact_mean, exact_var = z.mean(0), z.var(0, unbiased=True)
    batch_var = zb.var(1, unbiased=False).mean(0)  # E_B[σ²_B]
    torch.testing.assert_close(pop["exact"][0][0].double(), exact_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop["exact"][0][1].double(), exact_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop["paper"][0][0].double(), zb.mean(1).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop["paper"][0][1].double(), batch_var * m / (m - 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pop["uncorrected"][0][1].double(), batch_var, rtol=1e-5, atol=1e-6)
    # the trained network's buffers are left alone by the measure
    before = {k: v.clone() for k, v in arm.net.state_dict().items()}
    arm.evaluate()
    assert all(torch.equal(v, arm.net.state_dict()[k]) for k, v in before.items())


def test_batch_statistics_of_one_example_are_refused_and_buffers_stay(ds):
    cfg = T.TestStatsConfig()
    net = T.mlp(cfg)
    data = device_data(ds, "cpu")
    x, y = data.test_x[:64], data.test_y[:64]
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        T.accuracy_of(net, x, y, T.split_test_set(64, 1, 0), batch_stats=True)
    acc = T.accuracy_of(net, x, y, T.split_test_set(64, 8, 0), batch_stats=True)
    assert 0.0 <= acc <= 1.0
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in buffers.items())
    assert all(not bn.training and bn.track_running_stats for bn in T.bn_layers(net))


@pytest.mark.parametrize(("n", "b"), [(10_000, 60), (10_000, 1), (7, 2), (13, 5), (3, 10)])
def test_split_test_set_covers_each_row_once_in_near_equal_batches_of_at_least_b(n, b):
    batches = T.split_test_set(n, b, 0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    sizes = [len(r) for r in batches]
    assert len(sizes) == max(n // b, 1) and max(sizes) - min(sizes) <= 1 and min(sizes) >= min(b, n)
    if (n, b) == (10_000, 60):
        assert sorted(sizes) == [60] * 126 + [61] * 40


@pytest.mark.parametrize(("field", "value", "message"), [
    ("momenta", (0.1, 0.1), "momenta must be distinct values in (0, 1], at least one, got momenta=(0.1, 0.1)"),
    ("momenta", (), "momenta must be distinct values in (0, 1], at least one, got momenta=()"),
    ("momenta", (0.0,), "momenta must be distinct values in (0, 1], at least one, got momenta=(0.0,)"),
    ("test_batch_sizes", (8, 2), "test_batch_sizes must be increasing sizes >= 1, at least one, "
                                 "got test_batch_sizes=(8, 2)"),
    ("test_batch_sizes", (0, 2), "test_batch_sizes must be increasing sizes >= 1, at least one, "
                                 "got test_batch_sizes=(0, 2)"),
])
def test_validate_names_the_field_and_its_value(field, value, message):
    with pytest.raises(ValueError) as err:
        T.TestStatsConfig(**{field: value}).validate()
    assert str(err.value) == message


def test_quick_run(real_dir, tmp_path):
    out = tmp_path / "quick"
    meta = run_quick("test-stats", real_dir, out)
    cfg = meta["config"]
    assert cfg["seeds"] == 1 and cfg["momenta"] == [0.1, 0.01] and cfg["test_batch_sizes"] == [1, 2, 8, 60, 1000]
    run = RunFolder(out)
    records = run.records()
    last = records[-1]["bn"]
    sizes = cfg["test_batch_sizes"]
    # before the last evaluation only the largest test batch size is measured
    for r in records[:-1]:
        assert [r["bn"][f"acc/batch/b{b}"] is None for b in sizes] == [True] * 4 + [False]
    # batch statistics: undefined at b = 1, broken at b = 2, fine at the largest size
    assert last["acc/batch/b1"] is None
    assert last["acc/batch/b2"] < last["acc/batch/b1000"] - 0.2
    assert last["acc/batch/b2"] < last["acc/batch/b8"] < last["acc/batch/b1000"]
    assert last["acc/batch/b1000"] > 0.8
    # the exact population statistics: the same accuracy at every test batch size and on the whole set at once
    assert len({last[f"acc/exact/b{b}"] for b in sizes}) == 1
    assert last["acc/exact/b1"] == last["acc/exact"] > 0.8
    assert last["test_acc"] == last["acc/ema0.1"]
    # the paper's estimate: the exact mean, and its variance is the uncorrected one times m/(m-1)
    m = cfg["batch_size"]
    for i in (1, 2, 3):
        assert last[f"gap/l{i}/paper/mean_gap_rel"] < 1e-4
        ratio = last[f"gap/l{i}/paper/var_ratio"] / last[f"gap/l{i}/uncorrected/var_ratio"]
        assert ratio == pytest.approx(m / (m - 1), rel=1e-6)  # float32 buffers
        # a moving average lags the weights: never the exact statistics
        for name in ("ema0.1", "ema0.01", "cumulative"):
            assert last[f"gap/l{i}/{name}/mean_gap_rel"] > 1e-3 and last[f"gap/l{i}/{name}/var_ratio"] > 0
    # the cumulative average weighs the first steps as much as the last: the furthest from the population
    mean_gap = {n: np.mean([last[f"gap/l{i}/{n}/mean_gap_rel"] for i in (1, 2, 3)]) for n in ("ema0.1", "cumulative")}
    assert mean_gap["cumulative"] > mean_gap["ema0.1"]

    summary = run.summary()
    assert summary["acc"]["exact"] == {"mean": last["acc/exact"], "std": 0.0}
    assert summary["acc_by_batch"]["batch"]["1"] == {"mean": None, "std": None}
    assert summary["undefined"] == ["batch/b1"]
    assert summary["spread_over_batch_sizes"] == {"exact": 0.0}
    assert summary["gap"]["cumulative"]["l2"]["var_ratio"]["mean"] == last["gap/l2/cumulative/var_ratio"]
    table = run.table_path.read_text()
    assert "| batch statistics of the test batch | undefined |" in table.replace("  ", "")
    for name in T.methods(T.TestStatsConfig()):
        assert T.label(name) in table
    assert f"{last['acc/exact']:.4f}" in table and "m/(m−1) = 1.0169" in table
    # the header's |μ−μ_pop| is written \| (GitHub reads a literal pipe) and the report shows it as one cell
    assert "| L1 \\|μ−μ_pop\\|/σ_pop |" in table
    assert '<th class="right">L1 |μ−μ_pop|/σ_pop</th>' in markdown_html(table)


def test_resume_equals_uninterrupted(real_dir, tmp_path, monkeypatch):
    # The twins' buffers are part of the checkpoint; tuple fields (momenta) survive config.json.
    cfg = T.TestStatsConfig(steps=40, eval_every=20, seeds=1, workers=1, device="cpu", data_dir=str(real_dir),
                            test_batch_sizes=(2, 1000))
    runner.run(EXP, cfg, out=tmp_path / "base", **QUIET)
    indices = DataOrder.indices

    def interrupt_at_30(self, step):
        if step == 30:
            raise KeyboardInterrupt
        return indices(self, step)

    monkeypatch.setattr(DataOrder, "indices", interrupt_at_30)
    with pytest.raises(KeyboardInterrupt):
        runner.run(EXP, cfg, out=tmp_path / "r", **QUIET)
    monkeypatch.setattr(DataOrder, "indices", indices)
    runner.run(EXP, cfg, out=tmp_path / "r", resume=True, **QUIET)
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == (tmp_path / "base" / "metrics.jsonl").read_bytes()
    state = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["nets"]["bn"]["net"]
    assert any(k.startswith("twins.") for k in state)
    with pytest.raises(ValueError, match="momenta"):
        runner.run(EXP, T.TestStatsConfig(**{**json.loads((tmp_path / "r" / "config.json").read_text())["config"],
                                             "momenta": (0.1, 0.05), "test_batch_sizes": (2, 1000)}),
                   out=tmp_path / "r", resume=True, **QUIET)
