"""``normlab placement``: the networks of each variant, the measure (accuracy in chunks, skewnesses), the summary's
comparisons and verdicts, and the --quick run on the real data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import run_quick

from normlab import nn as nl
from normlab.diagnostics import channel_skewness
from normlab.lab.experiment import DeviceData, eval_metrics
from normlab.lab.experiments import placement as P
from normlab.lab.rundir import RunFolder

EXP = P.Placement()


# ---------------------------------------------------------------------------------------------------------------
# networks


def test_variants_build_the_placement_they_name_from_shared_weights():
    cfg = P.PlacementConfig()
    nets = {v: P.network(P.arm_name("mlp", "relu", v), cfg) for v in P.VARIANTS}
    assert [type(m) for m in nets["none"]] == [torch.nn.Linear, torch.nn.ReLU] * 3 + [torch.nn.Linear]
    for v in P.VARIANTS[1:]:
        bns = [m for m in nets[v] if isinstance(m, nl.BatchNorm1d)]
        assert len(bns) == 3
        assert all((b.activation, b.placement, b.affine) == ("relu", v.partition("_")[0], v.endswith("_affine"))
                   for b in bns)
        # before: no bias (the mean removes it) and, without affine, no shift at all; after: the bias stays
        assert (nets[v][0].bias is None) == v.startswith("before")
    for v in P.VARIANTS:  # the same weight matrices for every variant; the output layer's bias too
        for a, b in zip([m for m in nets[v] if isinstance(m, torch.nn.Linear)],
                        [m for m in nets["none"] if isinstance(m, torch.nn.Linear)]):
            assert torch.equal(a.weight, b.weight)
        assert torch.equal(nets[v][-1].bias, nets["none"][-1].bias)
    other = P.network("mlp-relu-none", P.PlacementConfig(seed=1))
    assert not torch.equal(other[0].weight, nets["none"][0].weight)
    w = nets["none"][0].weight
    assert w.abs().max() <= 1 / math.sqrt(784) and w.std() > 0.5 / math.sqrt(3 * 784)  # torch's default bound


def test_cnn_variants_are_channels_last_and_agree_with_a_contiguous_copy():
    cfg = P.PlacementConfig(cnn_channels=(3, 5))
    net = P.network("cnn-tanh-after_affine", cfg)
    bns = [m for m in net if isinstance(m, nl.BatchNorm2d)]
    assert [b.num_features for b in bns] == [3, 5] and bns[0].placement == "after"
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    twin = P.network("cnn-tanh-after_affine", cfg).to(memory_format=torch.contiguous_format)
    x = torch.rand(7, 1, 28, 28)
    torch.testing.assert_close(net(x), twin(x), rtol=1e-5, atol=1e-5)  # float32; layout only


# ---------------------------------------------------------------------------------------------------------------
# the measure


class _FakeArm:
    def __init__(self, net, n_test):
        g = torch.Generator().manual_seed(0)
        shape = (n_test, 784) if isinstance(net[0], torch.nn.Linear) else (n_test, 1, 28, 28)
        x = torch.rand(shape, generator=g)
        y = torch.randint(0, 10, (n_test,), generator=g)
        self.net, self.data = net.eval(), DeviceData(x[:10], y[:10], x, y)


@pytest.mark.parametrize("variant", ["none", "before", "after_affine"])
def test_measure_in_chunks_equals_one_batch_and_takes_the_skews_it_names(variant):
    torch.manual_seed(0)
    net = P.network(f"mlp-relu-{variant}", P.PlacementConfig())
    net.train()
    for _ in range(3):  # running statistics away from their initial values
        net(torch.rand(64, 784) * 2)
    arm = _FakeArm(net, 2 * P.EVAL_CHUNK + 37)  # two full chunks and a partial one
    with torch.no_grad():
        got = P._Measure(net)(arm)
        ref = eval_metrics(arm)
        assert got["test_acc"] == ref["test_acc"]
        assert got["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
        # independently: the hidden linear layers' outputs on the first chunk, through hooks
        seen = []
        hooks = [m.register_forward_hook(lambda m, a, out: seen.append(out)) for m in net[:-1]
                 if isinstance(m, torch.nn.Linear)]
        net(arm.data.test_x[:P.SKEW_IMAGES])
        for h in hooks:
            h.remove()
    # rel=1e-6, not bit-equality: a chunk and the first SKEW_IMAGES rows are different batch sizes, which may run on
    # different CPU paths (normlab.aten_ops.pays), equal to float32 rounding
    pre = torch.cat([channel_skewness(s) for s in seen])  # what BN normalizes when it sits before the ReLU
    post = torch.cat([channel_skewness(torch.relu(s)) for s in seen])  # ... after it; a plain block's output
    if variant == "none":
        assert got["skew_bn"] is None and got["skew_next"] == pytest.approx(float(post.nanmedian()), rel=1e-6)
    elif variant == "before":
        assert got["skew_bn"] == pytest.approx(float(pre.median()), rel=1e-6)
    else:  # BN after ReLU normalizes relu's output; a positive scale keeps its skewness, so out = in
        assert got["skew_bn"] == pytest.approx(float(post.nanmedian()), rel=1e-6)
        assert got["skew_next"] == pytest.approx(got["skew_bn"], rel=1e-4)  # float32 output


# ---------------------------------------------------------------------------------------------------------------
# configuration, summary, verdicts, table


@pytest.mark.parametrize(("field", "value", "message"), [
    ("model", "rnn", "model must be one of ('mlp', 'cnn', 'both')"),
    ("activations", ("relu", "relu"), "activations must be distinct names"),
    ("activations", ("softplus",), "activations must be distinct names"),
    ("acc_steps", (150,), "acc_steps must be positive multiples of eval_every=100"),
    ("target", 1.0, "target must be in (0, 1)"),
    ("cnn_channels", (8, 0), "cnn_channels must be one or more widths >= 1"),
    ("lr", 0.0, "lr must be > 0"),
])
def test_validate_names_the_field_and_its_value(field, value, message):
    with pytest.raises(ValueError) as err:
        P.PlacementConfig(**{field: value}).validate()
    assert message in str(err.value) and repr(value) in str(err.value)


def _records(cfg, final: dict) -> list[dict]:
    """Metrics records at steps 0, 100, 200 whose last test accuracy of arm/seed is ``final[variant][i]``; half
    of it at step 100, and skewnesses that name the variant."""
    out = []
    for step in (0, 100, 200):
        rec = {"step": step}
        for i, s in enumerate(P.seed_list(cfg)):
            for arm in EXP.arms(cfg):
                v = P.parse_arm(arm)[2]
                acc = {0: 0.1, 100: final[v][i] / 2, 200: final[v][i]}[step]
                rec[P.unit_key(arm, s, cfg)] = {"train_loss": None if step == 0 else 1.0, "test_loss": 1.0,
                                                "test_acc": acc, "skew_bn": None if v == "none" else 1.0 + i,
                                                "skew_next": 2.0}
        out.append(rec)
    return out


def test_summary_comparisons_ranking_and_verdicts():
    cfg = P.PlacementConfig(model="mlp", activations=("relu",), seeds=3, steps=200, acc_steps=(100,),
                            target=0.85)
    final = {"none": [0.80, 0.81, 0.79], "before": [0.90, 0.91, 0.92], "before_affine": [0.905, 0.905, 0.93],
             "after": [0.95, 0.96, 0.94], "after_affine": [0.94, 0.95, 0.945]}
    s = P.summarize(_records(cfg, final), cfg)
    info = s["arms"]["mlp-relu-after"]
    assert info["final"] == pytest.approx((0.95, 0.01)) and info["acc_at"]["100"][0] == pytest.approx(0.475)
    assert info["steps_to_target"] == 200 and info["reached"] == 3
    assert s["arms"]["mlp-relu-none"]["steps_to_target"] is None and s["arms"]["mlp-relu-none"]["reached"] == 0
    assert s["arms"]["mlp-relu-none"]["skew_bn"] == (None, None)
    assert s["arms"]["mlp-relu-before"]["skew_bn"] == pytest.approx((2.0, 1.0))
    comp = s["comparisons"]["mlp-relu"]
    assert comp["after-before"] == pytest.approx((0.04, np.std([0.05, 0.05, 0.02], ddof=1)))
    assert s["ranking"]["mlp-relu"] == ["after", "after_affine", "before_affine", "before", "none"]
    assert P.verdict(comp["after-before"], 3) == "+" and P.verdict(comp["before_affine-before"], 3) == "≈"
    assert P.verdict((-0.05, 0.001), 3) == "−" and P.verdict((0.05, 0.0), 1) == "?"
    text = P.agreement(s, "mlp")
    assert "BN after − BN before: ours +0.0400 ± 0.0173, CaffeNet +0.025: agrees." in text
    assert "ours BN after > BN after + γ,β > BN before + γ,β > BN before > no BN" in text
    flipped = {**final, "after": final["none"]}
    text = P.agreement(P.summarize(_records(cfg, flipped), cfg), "mlp")
    assert "BN after − BN before: ours -0.1100" in text and "CaffeNet +0.025: disagrees." in text

    table = P.format_table({**s, "config": {"eval_every": 100}})
    relu_none = next(line for line in table.splitlines() if line.startswith("| ReLU, no BN"))
    assert "0.8000 ± 0.0100" in relu_none and "> 200" in relu_none and relu_none.rstrip(" |").endswith("0.470")
    assert "| BN after − BN before " in table and "+0.025" in table and "3 seed(s)" in table


# ---------------------------------------------------------------------------------------------------------------
# the --quick run on the real data


@pytest.fixture(scope="module")
def quick_run(real_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("placement") / "quick"
    meta = run_quick("placement", real_dir, out)
    return out, meta


def test_quick_run_records_every_arm_with_finite_measures(quick_run):
    out, meta = quick_run
    run = RunFolder(out)
    cfg = meta["config"]
    assert (cfg["steps"], cfg["seeds"], cfg["model"], cfg["activations"]) == (100, 1, "both", ["sigmoid", "relu"])
    records = run.records()
    assert len(records[0]) - 1 == 2 * 2 * 5
    for r in records:
        for arm, m in r.items():
            if arm == "step":
                continue
            assert 0 <= m["test_acc"] <= 1 and math.isfinite(m["test_loss"]) and math.isfinite(m["skew_next"])
            assert (m["skew_bn"] is None) == arm.endswith("-none")
    s = run.summary()
    for arm, info in s["arms"].items():
        assert info["final"][0] == records[-1][arm]["test_acc"]
    for group, comp in s["comparisons"].items():
        finals = {v: s["arms"][f"{group}-{v}"]["final"][0] for v in P.VARIANTS}
        assert comp["after-before"][0] == pytest.approx(finals["after"] - finals["before"])
        assert s["ranking"][group] == sorted(P.VARIANTS, key=lambda v: -finals[v])


def test_quick_run_bn_after_relu_normalizes_a_right_skewed_distribution(quick_run):
    last = RunFolder(quick_run[0]).records()[-1]
    for model in P.MODELS:
        after, before = last[f"{model}-relu-after"]["skew_bn"], last[f"{model}-relu-before"]["skew_bn"]
        assert after > 0.8 and after > before + 0.5, (model, after, before)


def test_quick_run_bn_rescues_the_sigmoid_mlp(quick_run):
    last = RunFolder(quick_run[0]).records()[-1]
    plain = last["mlp-sigmoid-none"]["test_acc"]
    for v in P.VARIANTS[1:]:
        assert last[f"mlp-sigmoid-{v}"]["test_acc"] > plain + 0.3, v  # the paper's Figure 1 story, at 100 steps


def test_quick_run_table_prints_caffenet_beside_ours_and_says_whether_it_agrees(quick_run):
    table = RunFolder(quick_run[0]).table_path.read_text()
    relu_rows = [line for line in table.splitlines() if line.startswith("| ReLU, ")]
    assert len(relu_rows) == 10  # five variants, two models
    assert [row.rstrip(" |").rsplit(" ", 1)[-1] for row in relu_rows[:5]] == ["0.470", "0.474", "0.478", "0.499",
                                                                            "0.493"]
    assert "### MLP 784-100-100-100-10" in table and "### small CNN" in table
    assert "- **MLP, ReLU**: ours" in table and "- **CNN, ReLU**: ours" in table
    assert "one seed: no verdict" in table  # --quick has one seed: no noise estimate


def test_plot_redraws_the_quick_run(quick_run, tmp_path):
    from normlab.lab.plots import plot_run

    path = plot_run(quick_run[0], tmp_path / "again.png")
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
