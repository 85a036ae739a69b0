"""Batch renormalization (normlab.nn.BatchRenorm*, normlab.functional.batch_renorm) against the paper's equations in
the float64 reference, against batch norm where they must agree, and under torch.compile."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import normlab.functional as F
import normlab.nn as nl
from normlab import reference as ref
from tests.conftest import SHAPES, assert_close, assert_same_state, channels_last

RENORM = {2: "BatchRenorm1d", 3: "BatchRenorm1d", 4: "BatchRenorm2d", 5: "BatchRenorm3d"}
BN = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
TRAIN_SHAPES = [s for s in SHAPES if s[0] * int(np.prod(s[2:])) > 1]  # more than one value per channel


def _layer(shape, dtype=torch.float64, **kw):
    """A renorm layer for ``shape`` with non-trivial affine parameters and running statistics."""
    c = shape[1]
    layer = getattr(nl, RENORM[len(shape)])(c, dtype=dtype, **kw)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.randn(c))
            layer.bias.copy_(torch.randn(c))
        layer.running_mean.copy_(torch.randn(c))
        layer.running_var.copy_(torch.rand(c) * 3 + 0.05)
    return layer


def _reference_step(layer, x, dy):
    """The paper's training step in float64: ``(y, dx, dw, db, running_mean, running_var)`` after it."""
    w = None if layer.weight is None else layer.weight.detach().double().numpy()
    b = None if layer.bias is None else layer.bias.detach().double().numpy()
    rm, rv = layer.running_mean.double().numpy(), layer.running_var.double().numpy()
    y, cache = ref.batch_renorm_forward(x.double().numpy(), w, b, rm, rv, float(layer.rmax), float(layer.dmax),
                                        layer.eps, layer.activation, layer.placement, layer.negative_slope)
    dx, dw, db = ref.batch_renorm_backward(dy.double().numpy(), cache)
    a = x.double().numpy()
    if layer.activation is not None and layer.placement == "after":
        a = ref.activation_functions(layer.activation, layer.negative_slope)[0](a)
    mean, var, m = ref.batch_stats(a)
    new_rm = ref.running_update(rm, mean, layer.momentum)
    new_rv = ref.running_update(rv, var * m / (m - 1), layer.momentum)
    return [torch.from_numpy(np.asarray(t, dtype=np.float64)) for t in (y, dx, dw, db, new_rm, new_rv)]


def _check_step(layer, x, dtype, what):
    dy = torch.randn(x.shape, dtype=torch.float64)
    expected = _reference_step(layer, x, dy)
    xa = x.to(dtype).requires_grad_()
    y = layer(xa)
    y.backward(dy.to(dtype))
    got = [y, xa.grad]
    if layer.weight is not None:
        got += [layer.weight.grad, layer.bias.grad]
        layer.weight.grad = layer.bias.grad = None
    got += [layer.running_mean, layer.running_var]
    names = ["y", "dx", "dw", "db"][: len(got) - 2] + ["running_mean", "running_var"]
    expected = expected[:2] + (expected[2:4] if layer.weight is not None else []) + expected[4:]
    for name, a, e in zip(names, got, expected):
        scale = 1 + x.numel() ** 0.5 / 4 if name in ("dw", "db") else 2
        assert_close(a, e, dtype, scale=scale, what=f"{what} {name}")
    return y


@pytest.mark.parametrize("shape", TRAIN_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("act", [(None, "before"), ("silu", "before"), ("tanh", "after")])
def test_matches_paper_equations(shape, affine, act, cpu_backend):
    """Three training steps and an eval step, float64, against the reference's Algorithm 1: y, dx, dγ, dβ and the
    running buffers; rmax/dmax tight enough that some channels clip, loose enough that others do not."""
    layer = _layer(shape, affine=affine, rmax=1.5, dmax=0.5, activation=act[0], placement=act[1], momentum=0.2)
    for step in range(3):
        x = torch.randn(shape, dtype=torch.float64) * (1 + step) + step
        _check_step(layer, x, torch.float64, f"step {step}")
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    theirs = getattr(torch.nn, BN[len(shape)])(shape[1], affine=affine, dtype=torch.float64).eval()
    theirs.load_state_dict(layer.state_dict())
    f = torch.nn.Identity() if act[0] is None else {"silu": torch.nn.SiLU(), "tanh": torch.nn.Tanh()}[act[0]]
    expected = theirs(f(x)) if act[1] == "after" else f(theirs(x))
    assert_close(layer(x), expected, torch.float64, what="eval equals BatchNorm eval")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_against_reference(dtype):
    """float32 and bfloat16 inputs (float32 statistics) against the float64 reference on the same rounded values."""
    shape = (6, 4, 5)
    layer = _layer(shape, dtype=torch.float32, rmax=1.5, dmax=0.5)
    x = torch.randn(shape).to(dtype).double()
    _check_step(layer, x, dtype, str(dtype))


def test_channels_last(cpu_backend):
    shape = (4, 3, 5, 2)
    layer = _layer(shape, rmax=1.3, dmax=0.3)
    y = _check_step(layer, channels_last(torch.randn(shape, dtype=torch.float64)), torch.float64, "channels_last")
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_r1_d0_is_batch_norm():
    """rmax = 1, dmax = 0 (the warm-up): exactly batch norm with the same momentum, in outputs, gradients, buffers."""
    shape = (5, 3, 7)
    ours = _layer(shape, rmax=1.0, dmax=0.0, momentum=0.1, activation="relu")
    bn = nl.BatchNorm1d(3, dtype=torch.float64, momentum=0.1, activation="relu")
    bn.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), bn(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        for a, b in [(ya, yb), (xa.grad, xb.grad), (ours.weight.grad, bn.weight.grad), (ours.bias.grad, bn.bias.grad)]:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], v, atol=1e-12, rtol=1e-12, msg=k)


def test_clipping_active():
    """Channels built to clip r at rmax, at 1/rmax and not at all, and d at +dmax, -dmax and not at all: the layer
    follows the reference, and the reference's r and d are where the construction puts them."""
    n, c = 64, 3
    x = torch.randn(n, c, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0, correction=0)                        # batch mean 0, biased std 1 per channel
    layer = nl.BatchRenorm1d(c, dtype=torch.float64, rmax=2.0, dmax=1.0)
    with torch.no_grad():
        layer.running_var.copy_(torch.tensor([0.01, 100.0, 1.2]))       # σB/σ ≈ 10, 0.1, 0.91
        layer.running_mean.copy_(torch.tensor([-5.0, 5.0, 0.3]))        # d ≈ 50, -0.5, -0.27
    _, cache = ref.batch_renorm_forward(x.numpy(), None, None, layer.running_mean.numpy(), layer.running_var.numpy(),
                                        2.0, 1.0, layer.eps)
    r = cache[5].reshape(-1)
    mu_b, sigma = cache[3].reshape(-1), np.sqrt(layer.running_var.numpy() + layer.eps)
    d = np.clip((mu_b - layer.running_mean.numpy()) / sigma, -1.0, 1.0)
    np.testing.assert_allclose(r[:2], [2.0, 0.5])                       # clipped both ways
    assert 0.5 < r[2] < 2.0 and abs(d[1]) < 1 and abs(d[2]) < 1 and d[0] == 1.0
    _check_step(layer, x, torch.float64, "clipping")


def test_gradcheck_with_r_and_d_clipped():
    """gradcheck needs r and d locally constant (the backward treats them as constants while finite differences
    would move them): running statistics far from the batch's clip every channel, so r = ±rmax^±1 and d = ±dmax,
    and the check exercises the r-scaled backward and the d-shifted forward."""
    c = 3
    rm = torch.tensor([20.0, -20.0, 400.0], dtype=torch.float64)
    rv = torch.tensor([1e-4, 1e-4, 1e4], dtype=torch.float64)
    x = torch.randn(4, c, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return F.batch_renorm(x, rm.clone(), rv.clone(), w, b, training=True, rmax=2.0, dmax=1.5, activation="silu")

    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_eval_is_batch_norm_and_state_dict_is_torchs():
    ours = _layer((4, 3, 5))
    ours(torch.randn(4, 3, 5, dtype=torch.float64))
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())                          # strict: the same keys
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.BatchNorm1d)
    assert "rmax" not in ours.state_dict() and "dmax" not in ours.state_dict()
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


def test_non_finite_batch_leaves_running_stats_untouched():
    layer = _layer((8, 3))
    layer(torch.randn(8, 3, dtype=torch.float64))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = torch.randn(8, 3, dtype=torch.float64)
    bad[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(bad)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(layer.num_skipped_updates) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = layer(torch.randn(8, 3, dtype=torch.float64))              # the next good batch folds in
    assert torch.isfinite(y).all() and int(layer.num_batches_tracked) == 2


def test_torch_compile_fullgraph():
    """Train (with the limits changed between steps: buffers, so no recompile) and eval under fullgraph."""
    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nl.BatchRenorm2d(4, activation="relu", momentum=0.3),
                                   torch.nn.Flatten(), nl.BatchRenorm1d(144, rmax=1.2, dmax=0.2))

    torch._dynamo.reset()  # no graphs of other tests in the recompile accounting
    eager, compiled = net(), net()
    run = torch.compile(compiled, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            for model in (eager, compiled):
                nl.set_renorm_limits(model, *nl.renorm_schedule(step, 1, 2))
            x = torch.randn(5, 3, 8, 8)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = eager(xa), run(xb)
            dy = torch.randn_like(ya)
            ya.backward(dy)
            yb.backward(dy)
            # float32: r and d come from a var_mean that eager ATen and inductor may round differently
            assert_close(yb, ya, torch.float32, what="y")
            assert_close(xb.grad, xa.grad, torch.float32, scale=2, what="dx")
    assert_same_state(compiled, eager, torch.float32)
    eager.eval()
    compiled.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(run(x), eager(x))


def test_functional_torch_compile_with_number_limits():
    rm, rv = torch.randn(3), torch.rand(3) + 0.1
    w, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)

    def fn(x, running_mean, running_var):
        return F.batch_renorm(x, running_mean, running_var, w, b, training=True, rmax=1.5, dmax=0.5)

    run = torch.compile(fn, fullgraph=True)
    x = torch.randn(6, 3, 4)
    buffers = [(rm.clone(), rv.clone()) for _ in range(2)]
    ya, yb = fn(x, *buffers[0]), run(x, *buffers[1])
    ya.sum().backward()
    dw, db = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    yb.sum().backward()
    assert_close(yb, ya, torch.float32, what="y")
    assert_close(w.grad, dw, torch.float32, scale=8, what="dw")
    assert_close(b.grad, db, torch.float32, scale=8, what="db")
    for a, e in zip(buffers[1], buffers[0]):
        assert_close(a, e, torch.float32, what="running")
    assert not torch.equal(buffers[1][0], rm)


def test_schedule():
    paper = [(0, (1.0, 0.0)), (4999, (1.0, 0.0)), (5000, (1.0, 0.0)), (22500, (2.0, 4.375)), (25000, (15 / 7, 5.0)),
             (40000, (3.0, 5.0)), (10**6, (3.0, 5.0))]
    for step, expected in paper:
        assert nl.renorm_schedule(step, 5000, (35000, 20000)) == pytest.approx(expected), step
    assert nl.renorm_schedule(10, 10, 0, rmax=4.0, dmax=1.0) == (4.0, 1.0)
    assert nl.renorm_schedule(15, 10, 10, rmax=2.0, dmax=2.0) == (1.5, 1.0)


def test_set_renorm_limits():
    model = torch.nn.Sequential(nl.BatchRenorm1d(3), nl.BatchNorm1d(3), torch.nn.Sequential(nl.BatchRenorm2d(2)))
    assert nl.set_renorm_limits(model, 1.5, 0.25) == 2
    assert float(model[0].rmax) == 1.5 and float(model[2][0].dmax) == 0.25
    assert "rmax=1.5, dmax=0.25" in repr(model[0])
    with pytest.raises(ValueError, match=r"BatchRenorm1d: rmax must be a number >= 1, got 0\.5"):
        nl.set_renorm_limits(model, 0.5, 1.0)


@pytest.mark.parametrize("kw, match", [
    ({"rmax": 0.9}, r"BatchRenorm2d: rmax must be a number >= 1, got 0\.9"),
    ({"rmax": float("nan")}, r"BatchRenorm2d: rmax must be a number >= 1, got nan"),
    ({"rmax": "3"}, r"BatchRenorm2d: rmax must be a number >= 1, got '3'"),
    ({"dmax": -0.1}, r"BatchRenorm2d: dmax must be a number >= 0, got -0\.1"),
    ({"dmax": True}, r"BatchRenorm2d: dmax must be a number >= 0, got True"),
    ({"eps": 0.0}, r"BatchRenorm2d: eps must be > 0, got 0\.0"),
])
def test_bad_limits_name_the_layer(kw, match):
    with pytest.raises(ValueError, match=match):
        nl.BatchRenorm2d(3, **kw)


def test_functional_checks():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="batch_renorm needs running_mean and running_var"):
        F.batch_renorm(x, None, None, training=True)
    with pytest.raises(ValueError, match=r"dmax must be a number >= 0, got -1"):
        F.batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, dmax=-1)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_renorm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="schedule: step must be an int >= 0"):
        nl.renorm_schedule(-1, 5, 5)
