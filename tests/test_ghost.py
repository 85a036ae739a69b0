"""Ghost batch norm (``virtual_batch_size=`` on normlab's batch-norm layers and functional.batch_norm) against a
Python loop over the virtual batches in the float64 reference: outputs, every gradient, running buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab.functional as F
import normlab.nn as nl
from normlab import reference as ref
from tests.conftest import assert_close, assert_same_state, channels_last

BN = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}

# (shape, virtual_batch_size): divisible and not (the last virtual batch smaller), primes, size-1 dims, every rank.
CASES = [
    ((12, 3), 4),
    ((14, 5), 4),      # 4, 4, 4, 2
    ((7, 2, 3), 2),    # 2, 2, 2, 1 (the remainder's statistics over its 3 positions)
    ((9, 3, 5), 3),
    ((10, 3, 4, 5), 3),
    ((5, 1, 3, 2), 2),
    ((6, 2, 2, 3, 1), 4),
    ((4, 3, 1, 1, 5), 1),  # v = 1: per-sample statistics over the 5 positions
]


def _layer(shape, v, dtype=torch.float64, **kw):
    c = shape[1]
    layer = getattr(nl, BN[len(shape)])(c, dtype=dtype, virtual_batch_size=v, **kw)
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.randn(c))
            layer.bias.copy_(torch.randn(c))
        if layer.running_mean is not None:
            layer.running_mean.copy_(torch.randn(c))
            layer.running_var.copy_(torch.rand(c) + 0.5)
    return layer


def _check_step(layer, x, dtype, what):
    """One training step against the reference's loop over virtual batches; returns the output."""
    v = layer.virtual_batch_size
    w = None if layer.weight is None else layer.weight.detach().double().numpy()
    b = None if layer.bias is None else layer.bias.detach().double().numpy()
    x64 = x.double().numpy()
    y_ref, cache = ref.ghost_batch_norm_forward(x64, w, b, v, layer.eps, layer.activation, layer.placement,
                                                layer.negative_slope)
    dy = torch.randn(x.shape, dtype=torch.float64)
    dx_ref, dw_ref, db_ref = ref.ghost_batch_norm_backward(dy.numpy(), cache)
    expected = {"y": y_ref, "dx": dx_ref}
    if layer.track_running_stats:
        a = x64
        if layer.activation is not None and layer.placement == "after":
            a = ref.activation_functions(layer.activation, layer.negative_slope)[0](a)
        mean, var = ref.ghost_batch_stats(a, v)
        factor = layer.momentum if layer.momentum is not None else 1 / (int(layer.num_batches_tracked) + 1)
        expected["running_mean"] = ref.running_update(layer.running_mean.double().numpy(), mean, factor)
        expected["running_var"] = ref.running_update(layer.running_var.double().numpy(), var, factor)

    xa = x.to(dtype).requires_grad_()
    y = layer(xa)
    y.backward(dy.to(dtype))
    got = {"y": y, "dx": xa.grad}
    if layer.track_running_stats:
        got["running_mean"], got["running_var"] = layer.running_mean, layer.running_var
    if layer.weight is not None:
        got["dw"], got["db"] = layer.weight.grad, layer.bias.grad
        expected["dw"], expected["db"] = dw_ref, db_ref
        layer.weight.grad = layer.bias.grad = None
    for name, e in expected.items():
        scale = 1 + x.numel() ** 0.5 / 4 if name in ("dw", "db") else 2
        assert_close(got[name], torch.from_numpy(np.asarray(e, dtype=np.float64)), dtype, scale=scale,
                     what=f"{what} {name}")
    return y


@pytest.mark.parametrize("shape, v", CASES)
@pytest.mark.parametrize("act", [(None, "before"), ("relu", "before"), ("sigmoid", "after")])
def test_matches_loop_over_virtual_batches(shape, v, act, cpu_backend):
    layer = _layer(shape, v, activation=act[0], placement=act[1])
    for step in range(2):
        _check_step(layer, torch.randn(shape, dtype=torch.float64) * (1 + step) + step, torch.float64, f"step {step}")
    assert int(layer.num_batches_tracked) == 2  # one update per step


@pytest.mark.parametrize("shape, v", [((10, 3, 4, 5), 3), ((8, 2, 3, 2, 2), 4)])
def test_channels_last(shape, v, cpu_backend):
    layer = _layer(shape, v, activation="silu")
    y = _check_step(layer, channels_last(torch.randn(shape, dtype=torch.float64)), torch.float64, "channels_last")
    assert y.is_contiguous(memory_format=torch.channels_last if y.dim() == 4 else torch.channels_last_3d)


@pytest.mark.parametrize("affine, track, momentum", [(False, True, 0.1), (True, False, 0.1), (True, True, None)])
def test_options(affine, track, momentum):
    layer = _layer((11, 3, 2), 3, affine=affine, track_running_stats=track, momentum=momentum)
    for step in range(3):
        _check_step(layer, torch.randn(11, 3, 2, dtype=torch.float64) + step, torch.float64, f"step {step}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision(dtype):
    """float32 and bfloat16 (float32 statistics) against the float64 loop on the same rounded values."""
    layer = _layer((10, 4, 3), 4, dtype=torch.float32)
    _check_step(layer, torch.randn(10, 4, 3).to(dtype).double(), dtype, str(dtype))


@pytest.mark.parametrize("extra", [0, 3])
def test_virtual_batch_at_least_n_is_batch_norm(extra):
    shape = (6, 3, 4)
    ghost = _layer(shape, shape[0] + extra, activation="relu")
    plain = nl.BatchNorm1d(3, dtype=torch.float64, activation="relu")
    plain.load_state_dict(ghost.state_dict())
    x = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ghost(xa), plain(xb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(ghost.weight.grad, plain.weight.grad)
    for k, v in plain.state_dict().items():
        assert torch.equal(ghost.state_dict()[k], v), k


def test_eval_is_plain_batch_norm():
    ghost = _layer((8, 3, 5), 2)
    ghost(torch.randn(8, 3, 5, dtype=torch.float64))
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    theirs.load_state_dict(ghost.state_dict())
    ghost.eval()
    theirs.eval()
    x = torch.randn(8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), theirs(x))
    # without running statistics, eval normalizes with the whole batch's statistics, as torch does
    untracked = _layer((8, 3, 5), 2, track_running_stats=False).eval()
    theirs = torch.nn.BatchNorm1d(3, dtype=torch.float64, track_running_stats=False).eval()
    theirs.load_state_dict(untracked.state_dict())
    torch.testing.assert_close(untracked(x), theirs(x))


def test_single_value_virtual_batches_raise():
    """A virtual batch of one sample of an (N, C) input has one value per channel: batch norm's own error."""
    with pytest.raises(ValueError, match=r"virtual batch of 1 sample\(s\) of input size \(6, 3\) has 1 value"):
        nl.BatchNorm1d(3, virtual_batch_size=1)(torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"virtual batch of 1 sample\(s\) of input size \(9, 3\) has 1 value"):
        nl.BatchNorm1d(3, virtual_batch_size=4)(torch.randn(9, 3))  # 4, 4, then 1
    nl.BatchNorm1d(3, virtual_batch_size=4)(torch.randn(10, 3))    # 4, 4, 2: fine
    nl.BatchNorm1d(3, virtual_batch_size=1)(torch.randn(6, 3, 2))  # one sample, two positions: fine


def test_functional():
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = F.batch_norm(x, rm, rv, training=True, momentum=0.5, virtual_batch_size=4)
    y_ref, _ = ref.ghost_batch_norm_forward(x.numpy(), None, None, 4)
    np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-10, rtol=1e-8)
    mean, var = ref.ghost_batch_stats(x.numpy(), 4)
    np.testing.assert_allclose(rm.numpy(), 0.5 * mean, atol=1e-12)
    np.testing.assert_allclose(rv.numpy(), 0.5 + 0.5 * var, atol=1e-12)
    y = F.batch_norm(x, None, None, training=True, virtual_batch_size=4)  # no running buffers
    np.testing.assert_allclose(y.numpy(), y_ref, atol=1e-10, rtol=1e-8)


def test_non_finite_batch_leaves_running_stats_untouched():
    layer = _layer((8, 3), 4)
    before = {k: t.clone() for k, t in layer.state_dict().items()}
    bad = torch.randn(8, 3, dtype=torch.float64)
    bad[6, 0] = float("inf")  # in the second virtual batch only
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = layer(bad)
    assert torch.isfinite(y[:4]).all()
    for k, t in layer.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert int(layer.num_skipped_updates) == 1


def test_torch_compile_fullgraph():
    """Train (divisible and not) and eval under fullgraph: same outputs, gradients and buffers as eager."""
    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nl.BatchNorm2d(4, activation="relu", virtual_batch_size=2),
                                   torch.nn.Flatten(), nl.BatchNorm1d(144, virtual_batch_size=3))

    torch._dynamo.reset()  # no graphs of other tests in the recompile accounting
    eager, compiled = net(), net()
    run = torch.compile(compiled, fullgraph=True, dynamic=False)  # a graph per batch size (README)
    for n in (6, 8):  # 8: virtual batches of 3, 3 and 2 in the second layer
        x = torch.randn(n, 3, 8, 8)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), run(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(yb, ya, torch.float32, what="y")
        assert_close(xb.grad, xa.grad, torch.float32, scale=2, what="dx")
    assert_same_state(compiled, eager, torch.float32)
    eager.eval()
    compiled.eval()
    x = torch.randn(3, 3, 8, 8)
    assert_close(run(x), eager(x), torch.float32, what="eval")


@pytest.mark.parametrize("v", [0, -2, 2.0, True, "4"])
def test_bad_virtual_batch_size(v):
    with pytest.raises(ValueError, match=rf"BatchNorm2d: virtual_batch_size must be None or an int >= 1, got {v!r}"):
        nl.BatchNorm2d(3, virtual_batch_size=v)
    with pytest.raises(ValueError, match=rf"virtual_batch_size must be None or an int >= 1, got {v!r}"):
        F.batch_norm(torch.randn(4, 3), None, None, training=True, virtual_batch_size=v)


def test_repr_and_state_dict():
    layer = nl.BatchNorm1d(3, virtual_batch_size=8, activation="relu")
    assert "virtual_batch_size=8" in repr(layer)
    torch.nn.BatchNorm1d(3).load_state_dict(layer.state_dict())  # a constructor argument, not state
