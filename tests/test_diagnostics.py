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
from normlab.diagnostics import NormMonitor, norm_layers, percentiles, stats_gap


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


def test_core_module_does_not_import_the_lab():
    tree = ast.parse(Path(diag.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [n for n in names if n.startswith("normlab.lab")]
