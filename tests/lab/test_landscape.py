"""``normlab landscape``: noisy BN, the landscape and ICS measures against a by-hand computation on a copy of the
network, a measured run training the same weights as an unmeasured one, the claims' verdicts, and the --quick run on
the real data."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
from conftest import run_quick

from normlab import nn as nl
from normlab.lab import data as mnist_data
from normlab.lab import models as M
from normlab.lab.experiment import DeviceData, TorchArm
from normlab.lab.experiments import landscape as L
from normlab.lab.rundir import RunFolder

EXP = L.Landscape()


# ---------------------------------------------------------------------------------------------------------------
# noisy BN and the networks


def test_noise_is_a_per_sample_channel_scale_and_shift_redrawn_each_step_and_off_in_eval():
    torch.manual_seed(0)
    noise = L.ShiftScaleNoise(mean=0.5, std=0.5)
    x = torch.randn(5, 3, 4, 4)
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    torch.manual_seed(1)
    b = noise(zeros)
    torch.manual_seed(1)
    s_plus_b = noise(ones)
    torch.manual_seed(1)
    y = noise(x)
    torch.testing.assert_close(y, (s_plus_b - b) * x + b)  # y = s·x + b with the same draw
    assert torch.equal(b, b[:, :, :1, :1].expand_as(b))  # constant over the spatial dims
    assert b[:, :, 0, 0].unique().numel() == 15  # one per sample and channel
    assert not torch.equal(noise(zeros), noise(zeros))  # redrawn at each forward in training
    noise.eval()
    assert noise(x) is x
    # the distribution itself moves: per-step means of the shift spread like U(-0.5, 0.5) (std 0.29), far more
    # than the sampling noise of a mean of 4,000 draws (<= 0.5/sqrt(4000) = 0.008); the stds stay within U(0, 0.5)
    draws = [noise.draw(torch.empty(1000, 4, 2, 2)) for _ in range(300)]
    shift_means = np.array([float(b.mean()) for _, b in draws])
    scale_means = np.array([float(s.mean()) for s, _ in draws])
    assert 0.2 < shift_means.std() < 0.4 and np.abs(shift_means).max() < 0.52
    assert 0.2 < scale_means.std() < 0.4 and np.abs(scale_means - 1).max() < 0.52
    assert max(float(b.std()) for _, b in draws) < 0.53


def test_arms_share_their_weights_and_differ_only_in_the_norm():
    cfg = L.LandscapeConfig(channels=(3, 5), noise_mean=0.25, noise_std=0.75)
    nets = {a: L.network(a, cfg) for a in L.ARMS}
    assert "noisy_batch" in M.NORM_KINDS
    for a, net in nets.items():
        layers = [net[i] for i in L.weight_layers(net)]
        ref = [nets["standard"][i] for i in L.weight_layers(nets["standard"])]
        assert [type(m) for m in layers] == [torch.nn.Conv2d, torch.nn.Conv2d, torch.nn.Linear]
        assert all(torch.equal(m.weight, r.weight) for m, r in zip(layers, ref))
        assert (layers[0].bias is None) == (a != "standard")  # BN's shift takes the conv bias's place
        assert torch.equal(layers[-1].bias, ref[-1].bias)
        bns = [m for m in net.modules() if isinstance(m, nl.BatchNorm2d)]
        noises = [m for m in net.modules() if isinstance(m, L.ShiftScaleNoise)]
        assert len(bns) == {"standard": 0, "bn": 2, "noisy_bn": 2}[a]
        assert len(noises) == (2 if a == "noisy_bn" else 0)
        assert all((n.mean, n.std) == (0.25, 0.75) for n in noises)
    seq = nets["noisy_bn"][1]  # BN, then the noise, then the ReLU
    assert isinstance(seq[0], nl.BatchNorm2d) and isinstance(seq[1], L.ShiftScaleNoise)
    assert isinstance(nets["noisy_bn"][2], torch.nn.ReLU)
    other = L.network("standard", L.LandscapeConfig(channels=(3, 5), seed=1))
    assert not torch.equal(other[0].weight, nets["standard"][0].weight)
    fused = M.get_norm_layer("noisy_batch", 4, 2, activation="relu")  # the factory's fused form works too
    assert [type(m) for m in fused] == [nl.BatchNorm2d, L.ShiftScaleNoise, torch.nn.ReLU]


# ---------------------------------------------------------------------------------------------------------------
# the measures, against a by-hand computation on a copy of the network (float64)


def _tiny(norm: str, seed: int = 0) -> tuple[torch.nn.Sequential, torch.Tensor, torch.Tensor]:
    L.ensure_noisy_bn()
    torch.manual_seed(seed)
    net = M.make_cnn((2, 3), image_size=8, norm=norm, fuse=False).double()
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (7,))
    return net.train(), x, y


def _by_hand(net, x, y, shift: dict) -> tuple[float, dict]:
    """Loss and gradients of a deep copy of ``net`` whose parameters are moved by ``shift`` (name -> tensor)."""
    twin = copy.deepcopy(net)
    with torch.no_grad():
        for k, p in twin.named_parameters():
            p -= shift.get(k, torch.zeros_like(p))
    loss = torch.nn.functional.cross_entropy(twin(x), y)
    loss.backward()
    return loss.item(), {k: p.grad for k, p in twin.named_parameters()}


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_landscape_equals_moving_a_copy_of_the_network_by_hand(norm):
    net, x, y = _tiny(norm)
    state = copy.deepcopy(net.state_dict())
    etas = [0.05, 0.2, 1.0, 3.0]
    with torch.no_grad():  # as TorchArm.evaluate calls it
        got = L.landscape(net, x, y, etas, {k: b.clone() for k, b in net.named_buffers()})
    loss0, g = _by_hand(net, x, y, {})
    flat_g = torch.cat([t.flatten() for t in g.values()])
    losses, diffs = [], []
    for eta in etas:
        loss, ge = _by_hand(net, x, y, {k: eta * v for k, v in g.items()})
        losses.append(loss)
        diffs.append(float((flat_g - torch.cat([t.flatten() for t in ge.values()])).norm()))
    assert got["loss"] == pytest.approx(loss0, rel=1e-12)
    assert got["grad_norm"] == pytest.approx(float(flat_g.norm()), rel=1e-12)
    assert got["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-9)
    assert got["grad_range"] == pytest.approx(max(diffs) - min(diffs), rel=1e-9)
    assert got["beta"] == pytest.approx(max(d / (e * float(flat_g.norm())) for d, e in zip(diffs, etas)), rel=1e-9)
    assert got["loss_range"] > 0 and got["grad_range"] > 0
    for k, v in net.state_dict().items():  # parameters and running buffers untouched
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_ics_equals_updating_the_earlier_layers_of_a_copy_by_hand(norm):
    net, x, y = _tiny(norm, seed=3)
    lr = 0.5
    _, g = _by_hand(net, x, y, {})
    with torch.no_grad():
        got = L.ics(net, x, y, lr, g, {k: b.clone() for k, b in net.named_buffers()})
    layers = L.weight_layers(net)
    assert sorted(got) == sorted(f"ics_{m}_{n}" for m in ("l2", "cos") for n in range(2, len(layers) + 1))
    for n, idx in enumerate(layers[1:], start=2):
        earlier = {k: lr * v for k, v in g.items() if int(k.split(".")[0]) < idx}
        assert earlier and all(int(k.split(".")[0]) < idx for k in earlier)
        _, g2 = _by_hand(net, x, y, earlier)
        a, b = g[f"{idx}.weight"].flatten(), g2[f"{idx}.weight"].flatten()
        assert got[f"ics_l2_{n}"] == pytest.approx(float((a - b).norm()), rel=1e-9)
        assert got[f"ics_cos_{n}"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-12)
        assert 0 < got[f"ics_l2_{n}"] and -1 <= got[f"ics_cos_{n}"] < 1


def _arm(name: str, cfg: L.LandscapeConfig) -> TorchArm:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (80,), generator=g)
    data = DeviceData(x[:60], y[:60], x[60:], y[60:])
    order = mnist_data.DataOrder(60, cfg.batch_size, cfg.seed)
    return TorchArm(name, L.network(name, cfg), data, order, cfg.seed, "cpu", lr=cfg.lr, measure=L.Measure(cfg))


@pytest.mark.parametrize("arm", ["bn", "noisy_bn"])
def test_a_measured_run_trains_exactly_the_weights_of_an_unmeasured_one(arm):
    cfg = L.LandscapeConfig(channels=(2, 3), batch_size=10, step_grid=(0.5, 2.0), lr=0.2)
    measured, plain = _arm(arm, cfg), _arm(arm, cfg)
    records = []
    for start, end in ((0, 3), (3, 8)):
        measured.train(start, end)
        plain.train(start, end)
        before = copy.deepcopy(measured.net.state_dict())
        records.append(measured.evaluate())
        after = measured.net.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and BN buffers alike
        assert measured.net.training
    a, b = measured.net.state_dict(), plain.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert int(a["1.num_batches_tracked" if arm == "bn" else "1.0.num_batches_tracked"]) == 8
    r = records[-1]
    assert r["loss_range"] > 0 and r["grad_range"] > 0 and r["beta"] > 0
    assert {"ics_l2_2", "ics_l2_3", "ics_cos_2", "ics_cos_3"} <= set(r) and "ics_l2_1" not in r
    # the measure's batch is the next training batch, in train mode: its loss is what the next step sees
    rows = torch.from_numpy(measured.order.indices(8))
    net = copy.deepcopy(plain.net)
    if arm == "bn":
        loss = torch.nn.functional.cross_entropy(net(measured.data.train_x[rows]), measured.data.train_y[rows])
        assert r["loss"] == pytest.approx(loss.item(), rel=1e-6)
    # measuring twice gives the same numbers whatever the global RNG's state (noisy BN: the measure's noise draw
    # is a function of the seed and step)
    torch.manual_seed(123)
    assert measured.evaluate() == r


# ---------------------------------------------------------------------------------------------------------------
# configuration, summary and claims


@pytest.mark.parametrize(("field", "value", "message"), [
    ("step_grid", (1.0,), "step_grid must be two or more increasing values > 0"),
    ("step_grid", (2.0, 1.0), "step_grid must be two or more increasing values > 0"),
    ("step_grid", (0.0, 1.0), "step_grid must be two or more increasing values > 0"),
    ("noise_mean", 1.0, "noise_mean must be in [0, 1)"),
    ("noise_std", -0.1, "noise_std must be >= 0"),
    ("test_images", 0, "test_images must be in [1, 10000]"),
    ("channels", (4, 0), "channels must be one or more widths >= 1"),
    ("lr", 0.0, "lr must be > 0"),
])
def test_validate_names_the_field_and_its_value(field, value, message):
    with pytest.raises(ValueError) as err:
        L.LandscapeConfig(**{field: value}).validate()
    assert message in str(err.value) and repr(value) in str(err.value)


def _records(cfg, scale: dict, acc: dict) -> list[dict]:
    """Records at steps 0, 10, 20 whose measures are ``scale[arm][seed] * (step + 1)`` (ICS too) and whose test
    accuracy at steps 10 and 20 is ``acc[arm]``."""
    out = []
    for step in (0, 10, 20):
        rec = {"step": step}
        for i, s in enumerate(L.seed_list(cfg)):
            for a in L.ARMS:
                v = scale[a][i] * (step + 1)
                rec[L.unit_key(a, s, cfg)] = {
                    "train_loss": 1.0, "test_loss": 1.0, "test_acc": 0.1 if step == 0 else acc[a],
                    "loss": 1.0, "grad_norm": 1.0, "loss_range": v, "grad_range": v, "beta": v,
                    "ics_l2_2": v, "ics_l2_3": 3 * v, "ics_cos_2": 0.5, "ics_cos_3": 0.7}
        out.append(rec)
    return out


def test_summary_ratios_and_claims():
    cfg = L.LandscapeConfig(seeds=3, steps=20, eval_every=10)
    scale = {"standard": [2.0, 2.0, 2.0], "bn": [1.0, 1.1, 0.9], "noisy_bn": [1.0, 1.0, 1.0]}
    acc = {"standard": 0.5, "bn": 0.9, "noisy_bn": 0.88}
    s = L.summarize(_records(cfg, scale, acc), cfg)
    assert s["layers"] == [2, 3] and (s["first_step"], s["mid_step"], s["final_step"]) == (10, 10, 20)
    assert s["arms"]["noisy_bn"]["acc_first"] == pytest.approx((0.88, 0.0))
    # over steps 10 and 20: scale * 16; ICS: mean over layers of v and 3v = 2v
    assert s["arms"]["standard"]["loss_range"] == pytest.approx((32.0, 0.0))
    assert s["arms"]["standard"]["ics_l2"] == pytest.approx((64.0, 0.0))
    assert s["arms"]["bn"]["ics_cos"] == pytest.approx((0.6, 0.0))
    assert s["ics_layers"]["bn"]["3"]["l2"] == pytest.approx((48.0, 16 * 3 * 0.1))
    assert s["ics_layers"]["noisy_bn"]["2"]["cos"] == pytest.approx((0.5, 0.0))
    assert s["ratios"]["bn"]["beta"] == pytest.approx((0.5, 0.05))
    assert s["acc_diff"]["noisy_bn-bn"]["final"] == pytest.approx((-0.02, 0.0))
    verdicts = {c["metric"]: c["verdict"] for c in s["claims"]}
    # BN halves everything: the landscape claims agree; a clearly smaller ICS ℓ2 disagrees with "not smaller";
    # the cosines are equal: "not better aligned" holds; noisy BN is 0.02 from BN and 0.38 from standard
    assert verdicts == {"loss_range": "agrees", "grad_range": "agrees", "beta": "agrees", "ics_l2": "disagrees",
                        "ics_cos": "agrees (within noise: not clearly either way)", "test_acc": "agrees"}
    noisy = {**scale, "bn": [2.0, 2.2, 1.8]}  # BN as rough as standard: within noise for the landscape
    s2 = L.summarize(_records(cfg, noisy, {**acc, "noisy_bn": 0.55}), cfg)
    verdicts = {c["metric"]: c["verdict"] for c in s2["claims"]}
    assert verdicts["beta"] == "within noise" and verdicts["test_acc"] == "disagrees"
    assert verdicts["ics_l2"] == "agrees (within noise: not clearly either way)"
    larger = L.summarize(_records(cfg, {**scale, "bn": [3.0, 3.1, 2.9]}, acc), cfg)
    assert {c["metric"]: c["verdict"] for c in larger["claims"]}["ics_l2"] == "agrees"  # clearly larger with BN
    table = L.format_table({**s, "config": {"eval_every": 10}})
    assert "| BN makes the loss change less along the gradient (Fig. 4a)" in table
    assert "BN/standard 0.5 ± 0.05" in table and "| test acc @ 10 | test acc @ 10 | test acc @ 20 |" in re.sub(
        " +", " ", table) and "(0.25, 0.5, 1, 1.5, 2, 3, 4)" in table
    one = L.summarize(_records(L.LandscapeConfig(seeds=1, steps=20, eval_every=10),
                               {a: v[:1] for a, v in scale.items()}, acc), L.LandscapeConfig(seeds=1, steps=20,
                                                                                             eval_every=10))
    assert [c["verdict"] for c in one["claims"][:5]] == ["?"] * 5  # one seed: no noise estimate, no verdict


# ---------------------------------------------------------------------------------------------------------------
# the --quick run on the real data


@pytest.fixture(scope="module")
def quick_run(real_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("landscape") / "quick"
    meta = run_quick("landscape", real_dir, out, "--workers", "1")
    return out, meta


def test_quick_run_records_consistent_measures(quick_run):
    out, meta = quick_run
    cfg = meta["config"]
    assert (cfg["steps"], cfg["seeds"], cfg["channels"], cfg["step_grid"]) == (40, 1, [4, 8], [0.5, 1.0, 2.0])
    eta_max = cfg["lr"] * cfg["step_grid"][-1]
    records = RunFolder(out).records()
    for r in records:
        for a in L.ARMS:
            m = r[a]
            assert 0 <= m["test_acc"] <= 1 and m["loss_range"] >= 0 and m["grad_range"] >= 0
            # the largest gradient change is at least the range of changes: beta·η_max·‖g‖ >= max diff >= range
            assert m["beta"] * eta_max * m["grad_norm"] >= m["grad_range"] * (1 - 1e-9)
            assert sorted(k for k in m if k.startswith("ics_")) == ["ics_cos_2", "ics_cos_3", "ics_l2_2", "ics_l2_3"]
            assert all(-1 <= m[f"ics_cos_{i}"] <= 1 and m[f"ics_l2_{i}"] >= 0 for i in (2, 3))
    last = records[-1]
    assert last["bn"]["test_acc"] > last["standard"]["test_acc"] + 0.2  # BN trains much faster at the start
    assert last["noisy_bn"]["test_acc"] > last["standard"]["test_acc"] + 0.2  # ... and so does noisy BN
    s = RunFolder(out).summary()
    mean = np.mean([r["bn"]["beta"] for r in records[1:]])
    assert s["arms"]["bn"]["beta"][0] == pytest.approx(mean, rel=1e-12)
    assert s["ics_layers"]["standard"]["3"]["l2"][0] == pytest.approx(mean_of(records, "standard", "ics_l2_3"))
    assert s["ratios"]["bn"]["loss_range"][0] == pytest.approx(
        mean_of(records, "bn", "loss_range") / mean_of(records, "standard", "loss_range"), rel=1e-12)


def mean_of(records, arm, metric):
    return float(np.mean([r[arm][metric] for r in records[1:]]))


def test_quick_run_table_states_each_claim_and_the_figure_redraws(quick_run, tmp_path):
    from normlab.lab.plots import plot_run

    out, _ = quick_run
    table = RunFolder(out).table_path.read_text()
    texts = tuple(f"| {c[0]}" for c in L.CLAIMS) + ("| noisy BN trains",)
    claims = [line for line in table.splitlines() if line.startswith(texts)]
    assert len(claims) == len(L.CLAIMS) + 1
    assert all(line.rstrip(" |").endswith("?") for line in claims[:5])  # one seed: no verdict
    assert "| noisy BN " in table and "η = lr·k, lr = 0.1, k in (0.5, 1, 2)" in table
    assert "| ICS per layer: ‖G − G'‖ / cos | layer 2 | layer 3 |" in re.sub(" +", " ", table)
    png = plot_run(out, tmp_path / "again.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert math.isfinite(RunFolder(out).summary()["arms"]["noisy_bn"]["ics_l2"][0])
