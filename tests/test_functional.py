"""normlab.functional against torch.nn.functional and the float64 reference; argument checks; backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as F
from normlab import backend, reference, torch_ops
from normlab.spec import plan
from tests.conftest import ACT_PLACEMENTS, SHAPES, assert_close, channels_last


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("chunk", [1 << 18, 5])
def test_batch_norm_matches_torch_functional(shape, training, chunk, monkeypatch):
    monkeypatch.setattr(torch_ops, "CHUNK_VALUES", chunk)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    c = shape[1]
    w, b = torch.randn(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
    y2 = TF.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
    torch.testing.assert_close(y, y2)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y2, x, dy)[0])
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize(
    "kind, shape, kw",
    [("batch", (4, 3, 5), {}), ("batch", (6, 2), {}), ("instance", (2, 3, 7), {}), ("group", (2, 6, 5), {"groups": 2}),
     ("layer", (3, 2, 5), {"normalized_ndim": 2})],
)
@pytest.mark.parametrize("activation, placement", ACT_PLACEMENTS)
@pytest.mark.parametrize(
    "dtype, chunk",
    [(torch.float64, 1 << 18), (torch.float32, 1 << 18), (torch.bfloat16, 1 << 18), (torch.float16, 1 << 18),
     (torch.float64, 7), (torch.float32, 16)],
)
def test_matches_reference(kind, shape, kw, activation, placement, dtype, chunk, monkeypatch):
    """Output and all three gradients against the float64 reference, in each dtype; a small ``chunk`` makes the
    torch path process a few rows at a time, as it does on large inputs."""
    monkeypatch.setattr(torch_ops, "CHUNK_VALUES", chunk)
    p = plan(kind, shape, **kw)
    rng = np.random.default_rng(0)
    x64 = rng.normal(size=shape) * 2 + 0.5
    w64, b64, dy64 = rng.normal(size=p.affine_size), rng.normal(size=p.affine_size), rng.normal(size=shape)
    # round inputs to dtype first, so both sides see the same values
    x, w, b, dy = (torch.tensor(a).to(dtype) for a in (x64, w64, b64, dy64))
    y_ref, cache = reference.forward(x.double().numpy(), w.double().numpy(), b.double().numpy(), 1e-5, p,
                                     activation, placement)
    dx_ref, dw_ref, db_ref = reference.backward(dy.double().numpy(), cache)
    x.requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    fn = {
        "batch": lambda: F.batch_norm(x, None, None, w, b, True, activation=activation, placement=placement),
        "instance": lambda: F.instance_norm(x, weight=w, bias=b, activation=activation, placement=placement),
        "group": lambda: F.group_norm(x, kw.get("groups", 1), w, b, activation=activation, placement=placement),
        "layer": lambda: F.layer_norm(x, shape[1:], w.view(shape[1:]), b.view(shape[1:]), activation=activation,
                                      placement=placement),
    }[kind]
    y = fn()
    assert y.dtype == dtype
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    assert_close(y, torch.tensor(y_ref), dtype, what="y")
    assert_close(dx, torch.tensor(dx_ref), dtype, scale=2, what="dx")
    assert_close(dw, torch.tensor(dw_ref), dtype, scale=8, what="dw")
    assert_close(db, torch.tensor(db_ref), dtype, scale=8, what="db")


@pytest.mark.parametrize("chunk", [1 << 18, 40])
def test_large_mean_small_spread_float32(chunk, monkeypatch):
    """Mean 1e4 and std 1e-2 in float32: E[x^2] - E[x]^2 loses every digit; shifted, centered sums keep them."""
    monkeypatch.setattr(torch_ops, "CHUNK_VALUES", chunk)
    x = (torch.randn(64, 4, 9, dtype=torch.float64) * 1e-2 + 1e4).float()
    naive_var = (x * x).mean((0, 2)) - x.mean((0, 2)) ** 2
    true_var = x.double().var(dim=(0, 2), unbiased=False)
    assert not torch.allclose(naive_var.double(), true_var, rtol=0.5)  # the trap is real at this scale
    y_ref, cache = reference.batch_norm_forward(x.double().numpy(), None, None)
    rm, rv = torch.zeros(4), torch.ones(4)
    xr = x.clone().requires_grad_()
    y = F.batch_norm(xr, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(y.double(), torch.tensor(y_ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(rv.double(), x.double().var(dim=(0, 2)), rtol=1e-4, atol=0)
    dy = torch.randn_like(x)
    dx = torch.autograd.grad(y, xr, dy)[0]
    dx_ref = torch.tensor(reference.backward(dy.double().numpy(), cache)[0])
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5 * dx_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 2, 2, 3, 4)])
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
@pytest.mark.parametrize("chunk", [1 << 18, 10])
def test_channels_last_kept_and_correct(shape, kind, chunk, monkeypatch):
    monkeypatch.setattr(torch_ops, "CHUNK_VALUES", chunk)
    x = torch.randn(shape, dtype=torch.float64)
    xc = channels_last(x)
    run = {
        "batch": lambda t: F.batch_norm(t, None, None, training=True, activation="relu"),
        "instance": lambda t: F.instance_norm(t, activation="gelu"),
        "group": lambda t: F.group_norm(t, 1, activation="silu", placement="after"),
    }[kind]
    y, yc = run(x), run(xc)
    assert yc.is_contiguous(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    torch.testing.assert_close(y, yc)
    # view4 of a channels_last tensor is a view, not a copy
    p = plan(kind, shape, groups=1)
    assert torch_ops.view4(xc, p).data_ptr() == xc.data_ptr()


def test_momentum_none_needs_a_counter():
    with pytest.raises(ValueError, match="num_batches_tracked"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)
    rm, rv, n = torch.zeros(3), torch.ones(3), torch.zeros((), dtype=torch.long)
    batches = [torch.randn(5, 3) * (i + 1) for i in range(3)]
    for xb in batches:
        F.batch_norm(xb, rm, rv, training=True, momentum=None, num_batches_tracked=n)
    torch.testing.assert_close(rm, torch.stack([xb.mean(0) for xb in batches]).mean(0))
    torch.testing.assert_close(rv, torch.stack([xb.var(0) for xb in batches]).mean(0))  # cumulative, unbiased
    assert int(n) == 3


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(2), torch.ones(2)), ValueError,
         r"running_mean must have shape \(3,\).*got shape \(2,\)"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, torch.ones(4), training=True), ValueError,
         r"weight must have shape \(3,\)"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None), ValueError, "eval mode"),
        (lambda: F.batch_norm(torch.randn(4, 3), torch.zeros(3), None), ValueError, "both.*running_var=None"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True, eps=-1.0), ValueError, "eps must be > 0"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True, eps=float("nan")), ValueError, "eps"),
        (lambda: F.batch_norm(torch.randn(4), None, None, training=True), ValueError, "at least 2 dims"),
        (lambda: F.batch_norm(np.zeros((4, 3)), None, None, training=True), TypeError, "torch.Tensor"),
        (lambda: F.batch_norm(torch.ones(4, 3, dtype=torch.int32), None, None, training=True), TypeError, "int32"),
        (lambda: F.group_norm(torch.randn(2, 6, 3), 4), ValueError, r"num_groups \(4\) must divide.*\(6\)"),
        (lambda: F.group_norm(torch.randn(2, 6, 3), 3, torch.ones(3)), ValueError, r"weight must have shape \(6,\)"),
        (lambda: F.layer_norm(torch.randn(2, 6), (5,)), ValueError, "must end in normalized_shape"),
        (lambda: F.layer_norm(torch.randn(2, 6), 6, torch.ones(5)), ValueError, r"weight must have shape \(6,\)"),
        (lambda: F.instance_norm(torch.randn(2, 3, 1)), ValueError, "more than 1 spatial element"),
        (lambda: F.instance_norm(torch.randn(2, 3, 4), use_input_stats=False), ValueError, "needs running_mean"),
        (lambda: F.batch_norm(torch.randn(4, 3), None, None, training=True, activation="elu"), ValueError,
         "activation must be"),
    ],
)
def test_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_backend_choice(monkeypatch):
    x = torch.randn(2, 3)
    p = plan("batch", x.shape)
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    assert backend.select(x, p) is torch_ops
    monkeypatch.setenv("NORMLAB_BACKEND", "auto")
    assert backend.select(x, p) is torch_ops  # CPU tensors take the torch path under auto
    monkeypatch.setenv("NORMLAB_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND must be one of"):
        backend.select(x, p)


def test_float64_statistics_for_float64_input():
    x = torch.randn(5, 3, dtype=torch.float64)
    _, mean, var = torch_ops.forward(x, None, None, plan("batch", x.shape), 1e-5)
    assert mean.dtype == var.dtype == torch.float64
    _, mean, var = torch_ops.forward(x.bfloat16(), None, None, plan("batch", x.shape), 1e-5)
    assert mean.dtype == var.dtype == torch.float32
