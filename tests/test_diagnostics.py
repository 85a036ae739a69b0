"""normlab.diagnostics: percentiles of what each norm layer normalizes, and the train/eval statistics gap."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import normlab.diagnostics as diag
from normlab import nn as nl
from normlab import reference
from normlab.diagnostics import NormMonitor, batch_noise, norm_layers, percentiles, stats_distance, stats_gap


def _model():
    return nn.Sequential(nn.Linear(6, 5), nl.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4), nn.LayerNorm(4),
                         nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_finds_torch_and_normlab_norm_layers():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nl.BatchNorm2d(4), nn.GroupNorm(2, 4), nl.InstanceNorm2d(4),
                          nn.BatchNorm2d(4), nn.ReLU(), nl.LayerNorm([4]))
    assert list(norm_layers(model)) == ["1", "2", "3", "4", "6"]


def test_percentiles_match_numpy_in_float64():
    x = torch.randn(37, 5, dtype=torch.float32)
    p = percentiles(x, (2.5, 50, 97))
    assert list(p) == ["p2.5", "p50", "p97"]
    ref = np.percentile(x.double().numpy(), [2.5, 50, 97])
    assert [p["p2.5"], p["p50"], p["p97"]] == [float(v) for v in ref]
    assert percentiles(x.numpy()) == percentiles(x)


def test_monitor_records_inputs_every_nth_training_call_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = _model()
    twin = _model()
    twin.load_state_dict(model.state_dict())
    mon = NormMonitor(model, every=2)
    xs = [torch.randn(11, 6) * 3 + 1 for _ in range(5)]
    seen = {}
    hook = model[1].register_forward_pre_hook(lambda m, a: seen.setdefault(len(seen), a[0].detach().clone()))
    for i, x in enumerate(xs):
        mon.step = 100 * i
        torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)  # watching changes nothing
    hook.remove()
    model.eval()
    model(xs[0])  # eval calls are not recorded in mode="train"
    assert [r["step"] for r in mon.records if r["layer"] == "1"] == [0, 200, 400]
    assert {r["layer"] for r in mon.records} == {"1", "4", "6"}
    rec = mon.records[0]
    assert rec == {**rec, **percentiles(seen[0])}
    # the gap: measured before the layer's running update, on what it normalizes
    fresh = nl.BatchNorm1d(5)
    gap = stats_gap(fresh, seen[0])
    mean, var = seen[0].double().mean(0), seen[0].double().var(0, unbiased=False)
    assert gap["mean_gap"] == pytest.approx(mean.abs().mean().item())
    assert gap["var_ratio"] == pytest.approx(var.mean().item())
    assert rec["mean_gap"] == pytest.approx(gap["mean_gap"]) and rec["var_ratio"] == pytest.approx(gap["var_ratio"])
    assert "mean_gap" not in mon.latest("4")  # layer norm has no running statistics
    assert mon.history("1", "p50") == [(r["step"], r["p50"]) for r in mon.records if r["layer"] == "1"]
    mon.remove()
    model.train()
    model(xs[0])
    assert len(mon.records) == 9


def test_gap_shrinks_as_running_statistics_converge():
    torch.manual_seed(1)
    bn = nl.BatchNorm1d(4, momentum=0.5)
    with NormMonitor(layers={"bn": bn}) as mon:
        for _ in range(30):
            bn(torch.randn(256, 4) * 2 + 5)
    first, last = mon.records[0], mon.records[-1]
    assert first["mean_gap"] > 4 and first["var_ratio"] > 3  # running stats start at 0 and 1
    assert last["mean_gap_rel"] < 0.3 and 0.7 < last["var_ratio"] < 1.3


def test_fused_after_layer_is_watched_on_what_it_normalizes():
    bn = nl.BatchNorm1d(3, activation="relu", placement="after")  # y = bn(relu(x))
    x = torch.randn(50, 3)
    with NormMonitor(layers={"bn": bn}) as mon:
        bn(x)
    assert mon.latest("bn")["p15"] == percentiles(torch.relu(x))["p15"] >= 0


def test_output_eval_mode_and_select():
    sig = nn.Sigmoid()
    with NormMonitor(layers={"s": sig}, where="input", mode="eval", select=lambda t: t[:, 1], gap=False) as mon:
        x = torch.randn(20, 3)
        sig(x)  # training mode: not recorded
        sig.eval()
        sig(x)
    assert len(mon.records) == 1 and mon.latest("s")["p50"] == percentiles(x[:, 1])["p50"]
    lin = nn.Linear(3, 2)
    with NormMonitor(layers={"lin": lin}, where="output", mode="any") as mon:
        y = lin(x)
    assert mon.latest("lin")["p85"] == percentiles(y)["p85"]


def _skew_numpy(a: np.ndarray, axes) -> np.ndarray:
    d = a - a.mean(axis=axes, keepdims=True)
    return (d**3).mean(axis=axes) / (d**2).mean(axis=axes) ** 1.5


@pytest.mark.parametrize("shape", [(37, 5), (13, 3, 7, 5), (2, 1, 3, 1), (11, 4, 1)])
def test_channel_skewness_matches_the_moment_formula_in_float64(shape):
    torch.manual_seed(2)
    x = torch.randn(shape).exp()  # log-normal: skewed to the right
    axes = (0, *range(2, len(shape)))
    ref = _skew_numpy(x.double().numpy(), axes)
    sk = diag.channel_skewness(x)
    assert sk.dtype == torch.float64 and sk.shape == (shape[1],)
    np.testing.assert_allclose(sk.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert (sk > 0).all()
    # a positive per-channel scale and shift (what batch norm applies) leaves it unchanged; a flip negates it
    scale = torch.rand(shape[1]).add(0.5).reshape(1, -1, *[1] * (len(shape) - 2))
    torch.testing.assert_close(diag.channel_skewness(x * scale + 3), sk, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(diag.channel_skewness(-x), -sk, rtol=1e-12, atol=1e-12)


def test_channel_skewness_of_known_distributions_channels_last_and_dead_units():
    torch.manual_seed(3)
    x = torch.randn(400, 3, 30, 30)
    x[:, 1] = torch.relu(x[:, 1])  # rectified Gaussian
    x[:, 2] = 0.0  # a dead ReLU unit: no skewness
    mu = 1 / math.sqrt(2 * math.pi)  # relu(Z)'s mean; E[relu(Z)²] = 1/2, E[relu(Z)³] = √(2/π)
    relu_skew = (math.sqrt(2 / math.pi) - 1.5 * mu + 2 * mu**3) / (0.5 - mu**2) ** 1.5  # ≈ 1.6406
    sk = diag.channel_skewness(x)  # 360,000 values per channel: standard errors ≈ 0.004 (Gaussian), ≈ 0.01
    assert abs(sk[0].item()) < 0.02 and sk[1].item() == pytest.approx(relu_skew, abs=0.04) and sk[2].isnan()
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(diag.channel_skewness(cl), sk, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "give either a model or layers"),
    ({"model": nn.Linear(2, 2)}, "has no normalization layer"),
    ({"layers": {"a": nn.ReLU()}, "every": 0}, "every must be an int >= 1, got 0"),
    ({"layers": {"a": nn.ReLU()}, "where": "inside"}, "where must be one of ('input', 'output'), got 'inside'"),
    ({"layers": {"a": nn.ReLU()}, "mode": "test"}, "mode must be one of ('train', 'eval', 'any'), got 'test'"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        NormMonitor(**kwargs)
    assert message in str(err.value)
    with pytest.raises(KeyError, match="no record of layer 'x'"):
        NormMonitor(layers={"a": nn.ReLU()}).latest("x")

# -- batch_noise: the spread of one example's normalized value over the mini-batches it is placed in


@pytest.mark.parametrize("shape", [(23, 3), (17, 2, 3, 1), (11, 1, 5)])
def test_batch_noise_matches_the_float64_reference_on_the_same_draws(shape):
    x = torch.randn(*shape, dtype=torch.float32) * 3 + 1
    sizes, draws, example, seed, eps = (2, 5, shape[0]), 7, 4, 3, 1e-3
    got = batch_noise(x, sizes, example=example, draws=draws, eps=eps, seed=seed)
    # the same draws, normalized by normlab.reference's batch norm forward (training mode, no affine)
    rng = np.random.default_rng(seed)
    rest = np.delete(np.arange(shape[0]), example)
    xs = x.double().numpy()
    for m in sizes:
        xhat = []
        for _ in range(draws):
            batch = np.concatenate([xs[example:example + 1], xs[rng.choice(rest, m - 1, replace=False)]])
            xhat.append(reference.batch_norm_forward(batch, None, None, eps)[0][0])  # the example's row
        assert got[m] == pytest.approx(np.std(xhat, axis=0, ddof=1).mean(), rel=1e-10, abs=1e-12), m
    assert list(got) == list(sizes)


def test_batch_noise_is_zero_when_the_batch_is_always_the_whole_pool_and_invariant_to_channel_affines():
    x = torch.randn(9, 4, dtype=torch.float64)
    assert batch_noise(x, [9], draws=5)[9] == pytest.approx(0.0, abs=1e-12)  # every draw: the same batch
    scale, shift = torch.tensor([0.1, 1.0, 7.0, 300.0]), torch.tensor([-5.0, 0.0, 2.0, 1e3])
    a = batch_noise(x, [2, 3, 8], draws=50, eps=0.0)
    b = batch_noise(x * scale + shift, [2, 3, 8], draws=50, eps=0.0)
    assert a == pytest.approx(b, rel=1e-9)  # BN removes a per-channel scale and shift


def test_batch_noise_at_two_is_a_sign_and_falls_like_one_over_root_m():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    z = ((x - x.mean()) / x.std(correction=0))[:, 0]
    lowest = int(z.argmin())
    # with m = 2, x̂ = ±1 by the sign against the other example: the lowest is always -1, the median flips
    assert batch_noise(x, [2], example=lowest, draws=50, eps=0.0)[2] == pytest.approx(0.0, abs=1e-12)
    median = int((z - z.median()).abs().argmin())
    assert batch_noise(x, [2], example=median, draws=400, eps=0.0)[2] == pytest.approx(1.0, abs=0.06)
    # large m: std ≈ sqrt((1 + z² (κ - 1) / 4) / m), κ = 3 for Gaussian data (the mean's and variance's noise)
    for target in (0.0, 2.0):
        i = int((z - target).abs().argmin())
        got = batch_noise(x, [64, 256], example=i, draws=600)
        for m, v in got.items():
            assert v * m ** 0.5 == pytest.approx((1 + target**2 / 2) ** 0.5, rel=0.15), (target, m)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((torch.randn(5), [2]), {}, "at least 2 dims"),
    ((torch.randn(5, 2), [2]), {"example": 5}, "example must be in [0, 5) (the pool's size), got 5"),
    ((torch.randn(5, 2), [2]), {"draws": 1}, "draws must be an int >= 2"),
    ((torch.randn(5, 2), [1, 2, 6]), {}, "batch sizes must be in [2, 5] (the pool's size), got [1, 6]"),
    ((torch.tensor([[1.0], [float("nan")]]), [2]), {}, "x has non-finite values"),
])
def test_batch_noise_bad_arguments(args, kwargs, message):
    with pytest.raises(ValueError) as err:
        batch_noise(*args, **kwargs)
    assert message in str(err.value)


def test_core_module_does_not_import_the_lab():
    tree = ast.parse(Path(diag.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("normlab.lab")]


def test_stats_distance_by_hand():
    mean, var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 1.0, 0.25])
    ref_mean, ref_var = torch.tensor([0.0, -1.0, 0.5]), torch.tensor([1.0, 4.0, 0.25])
    d = stats_distance(mean, var, ref_mean, ref_var, eps=0.0)
    assert d["mean_gap"] == pytest.approx((1 + 1 + 0) / 3)
    assert d["mean_gap_rel"] == pytest.approx((1 / 1 + 1 / 2 + 0) / 3)
    assert d["var_ratio"] == pytest.approx((4 + 0.25 + 1) / 3)
    assert stats_distance(mean, var, mean, var, eps=1e-5) == {"mean_gap": 0.0, "mean_gap_rel": 0.0, "var_ratio": 1.0}
