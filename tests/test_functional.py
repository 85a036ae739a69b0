"""normlab.functional against torch.nn.functional and the float64 reference; argument checks; backend choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as F
from normlab import aten_ops, backend, native, numba_ops, reference, spec, torch_ops
from normlab.spec import plan
from tests.conftest import ACT_PLACEMENTS, CPU_BACKENDS, SHAPES, assert_close, channels_last


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch_functional(shape, training, cpu_backend):
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
    "dtype, cpu_backend",
    [(dtype, name) for dtype in (torch.float64, torch.float32) for name in CPU_BACKENDS]
    + [(torch.bfloat16, "torch"), (torch.float16, "torch")],  # half precision: the torch path (numba refuses it)
    indirect=["cpu_backend"],
)
def test_matches_reference(kind, shape, kw, activation, placement, dtype, cpu_backend):
    """Output and all three gradients against the float64 reference, in each dtype, on each CPU backend."""
    _check_reference(kind, shape, kw, activation, placement, dtype)


# Shapes longer than one numba tile (TILE = 1024 values): runs split into tiles, tiles of several rows of channels,
# and per-channel sums folded across many tiles.
@pytest.mark.parametrize(
    "kind, shape, kw",
    [("batch", (3, 2, 1500), {}), ("batch", (2100, 3), {}), ("batch", (3, 700, 2), {}), ("layer", (3, 2100), {}),
     ("group", (2, 4, 900), {"groups": 2}), ("instance", (2, 3, 1100), {})],
)
@pytest.mark.parametrize("activation, placement", [(None, "before"), ("silu", "before"), ("tanh", "after")])
def test_long_rows_match_reference(kind, shape, kw, activation, placement, cpu_backend):
    if kind == "layer":
        kw = {"normalized_ndim": 1}
    _check_reference(kind, shape, kw, activation, placement, torch.float32)


def _check_reference(kind, shape, kw, activation, placement, dtype):
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
    k = p.normalized_ndim
    fn = {
        "batch": lambda: F.batch_norm(x, None, None, w, b, True, activation=activation, placement=placement),
        "instance": lambda: F.instance_norm(x, weight=w, bias=b, activation=activation, placement=placement),
        "group": lambda: F.group_norm(x, kw.get("groups", 1), w, b, activation=activation, placement=placement),
        "layer": lambda: F.layer_norm(x, shape[-k:], w.view(shape[-k:]), b.view(shape[-k:]), activation=activation,
                                      placement=placement),
    }[kind]
    y = fn()
    assert y.dtype == dtype
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    assert_close(y, torch.tensor(y_ref), dtype, what="y")
    assert_close(dx, torch.tensor(dx_ref), dtype, scale=2, what="dx")
    assert_close(dw, torch.tensor(dw_ref), dtype, scale=8, what="dw")
    assert_close(db, torch.tensor(db_ref), dtype, scale=8, what="db")


@pytest.mark.parametrize("shape", [(64, 4, 9), (64, 4)])  # both numba families: blocks, and rows of channels
@pytest.mark.parametrize("activation", [None, "relu"])
def test_large_mean_small_spread_float32(shape, activation, cpu_backend):
    """Mean 1e4 and std 1e-2 in float32: E[x^2] - E[x]^2 loses every digit; shifted, centered sums keep them. With
    ReLU before the norm, f'(z) sees the rounding of the saved float32 mean unless the backward re-centres first."""
    axes = (0, 2) if len(shape) == 3 else (0,)
    x = (torch.randn(shape, dtype=torch.float64) * 1e-2 + 1e4).float()
    naive_var = (x * x).mean(axes) - x.mean(axes) ** 2
    true_var = x.double().var(dim=axes, unbiased=False)
    assert not torch.allclose(naive_var.double(), true_var, rtol=0.5)  # the trap is real at this scale
    y_ref, cache = reference.batch_norm_forward(x.double().numpy(), None, None, activation=activation)
    rm, rv = torch.zeros(4), torch.ones(4)
    xr = x.clone().requires_grad_()
    y = F.batch_norm(xr, rm, rv, training=True, momentum=1.0, activation=activation)
    torch.testing.assert_close(y.double(), torch.tensor(y_ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(rv.double(), x.double().var(dim=axes), rtol=1e-4, atol=0)
    dy = torch.randn_like(x)
    dx = torch.autograd.grad(y, xr, dy)[0]
    dx_ref = torch.tensor(reference.backward(dy.double().numpy(), cache)[0])
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5 * dx_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind, kw", [("layer", {"normalized_ndim": 2}), ("group", {"groups": 2}), ("instance", {}),
                                      ("batch", {})])
def test_large_mean_small_spread_every_kind(kind, kw, cpu_backend):
    """Every kind keeps its digits on mean 1e4, std 1e-2 in float32 (torch.nn's layer norm is off by ~0.2 here)."""
    x = (torch.randn(6, 4, 5, 7, dtype=torch.float64) * 1e-2 + 1e4).float().requires_grad_()
    p = plan(kind, x.shape, **kw)
    y_ref, cache = reference.forward(x.detach().double().numpy(), None, None, 1e-5, p)
    y = {"layer": lambda: F.layer_norm(x, (5, 7)), "group": lambda: F.group_norm(x, 2),
         "instance": lambda: F.instance_norm(x), "batch": lambda: F.batch_norm(x, None, None, training=True)}[kind]()
    torch.testing.assert_close(y.double(), torch.tensor(y_ref), atol=1e-5, rtol=0)
    dy = torch.randn_like(y)
    dx = torch.autograd.grad(y, x, dy)[0]
    dx_ref = torch.tensor(reference.backward(dy.double().numpy(), cache)[0])
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5 * dx_ref.abs().max().item(), rtol=0)


def test_outlier_first_value_float32(cpu_backend):
    """A statistic whose first value is a 1e4-sigma outlier: sums shifted by that one value would lose the spread's
    digits in float32; the statistics and the output still match the float64 reference."""
    x = torch.randn(8, 3, 300, dtype=torch.float64)
    x[0, :, 0] = 1e4
    x = x.float()
    y_ref, cache = reference.batch_norm_forward(x.double().numpy(), None, None)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    torch.testing.assert_close(y.double(), torch.tensor(y_ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), x.double().var(dim=(0, 2)), rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 2, 2, 3, 4)])
@pytest.mark.parametrize("kind", ["batch", "instance", "group"])
def test_channels_last_kept_and_correct(shape, kind, cpu_backend):
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
    call = spec.call("batch", x.shape, 1e-5)
    monkeypatch.setenv("NORMLAB_BACKEND", "torch")
    assert backend.select(x, p) is torch_ops and backend.graph_path(x, None, None, call) is None
    monkeypatch.setenv("NORMLAB_BACKEND", "auto")
    assert backend.select(x, p) is numba_ops  # the backend module of float32/float64 CPU tensors (torch.compile's)
    big = torch.empty(2, aten_ops.SMALL)
    big_call = spec.call("batch", big.shape, 1e-5)
    if native.available():  # eager: the native kernels, whatever the size
        assert backend.graph_path(x, None, None, call) is native
        assert backend.graph_path(big, None, None, big_call) is native
    assert backend.graph_path(x.bfloat16(), None, None, call) is None  # half precision: the torch path
    assert backend.graph_path(x, torch.ones(3, dtype=torch.float64), None, call) is not native  # mixed dtypes
    # without the native kernels: ATen's kernels on shifted input where they were measured faster than the loops,
    # for a training step (an input that requires grad) or a forward alone
    monkeypatch.setattr(native, "available", lambda: False)
    x.requires_grad_()
    big.requires_grad_()
    assert backend.graph_path(x, None, None, call) is aten_ops  # small inputs
    assert backend.graph_path(big, None, None, big_call) is None  # (N, C): the loops' rows of channels
    planes = torch.empty(8, 64, 16, 16, requires_grad=True)  # more than SMALL values
    assert backend.graph_path(planes, None, None, spec.call("batch", planes.shape, 1e-5)) is aten_ops  # short planes
    assert backend.graph_path(channels_last(planes), None, None, spec.call("batch", planes.shape, 1e-5)) is None
    layer = spec.call("layer", big.shape, 1e-5, normalized_ndim=1)
    assert backend.graph_path(big, None, None, layer) is aten_ops  # layer norm: training steps ...
    assert backend.graph_path(big.detach(), None, None, layer) is None  # ... not a forward alone
    with torch.no_grad():
        assert backend.graph_path(big, None, None, layer) is None
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    assert backend.graph_path(x, None, None, call) is None
    monkeypatch.setenv("NORMLAB_BACKEND", "aten")
    assert backend.graph_path(big, None, None, big_call) is aten_ops  # forced: whatever the size
    assert backend.select(x, p) is numba_ops  # what the ATen path does not take runs as under auto
    monkeypatch.setenv("NORMLAB_BACKEND", "native")
    assert backend.graph_path(x, None, None, call) is native  # forced (its norm raises when it is not built)
    assert backend.select(x.bfloat16(), p) is torch_ops  # half precision: the torch path
    assert backend.select(x[:0], p) is torch_ops  # an empty batch: the torch path
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    with pytest.raises(RuntimeError, match="NORMLAB_BACKEND=numba, but it does not support.*bfloat16"):
        backend.select(x.bfloat16(), p)
    monkeypatch.setenv("NORMLAB_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="NORMLAB_BACKEND must be one of"):
        backend.select(x, p)


@pytest.mark.parametrize("impl", [torch_ops, numba_ops])
def test_statistics_dtype(impl):
    """float64 statistics for float64 input, float32 otherwise; rstd of the statistics' shape."""
    x = torch.randn(5, 3, dtype=torch.float64)
    call = spec.call("batch", x.shape, 1e-5)
    _, mean, rstd, var = impl.forward(x, None, None, call)
    assert mean.dtype == rstd.dtype == var.dtype == torch.float64
    assert mean.shape == rstd.shape == var.shape == (1, 3)
    _, mean, rstd, var = impl.forward(x.float(), None, None, call)
    assert mean.dtype == rstd.dtype == var.dtype == torch.float32
    if impl is torch_ops:
        _, mean, _, _ = impl.forward(x.bfloat16(), None, None, call)
        assert mean.dtype == torch.float32


def test_numba_results_do_not_depend_on_the_thread_count():
    """The work split and every merge order depend on the shape only: 1 and 2 threads give the same bits."""
    x = torch.randn(16, 8, 40, 40)
    dy = torch.randn_like(x)
    w, b = torch.rand(8) + 0.5, torch.randn(8)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for inp in (x, channels_last(x)):
                call = spec.call("batch", inp.shape, 1e-5, "silu")
                y, mean, rstd, _ = numba_ops.forward(inp, w, b, call)
                results.append((y, *numba_ops.backward(dy, inp, w, b, mean, rstd, call)))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(results[:2], results[2:]):
        for a, b_ in zip(one, two):
            assert torch.equal(a, b_)


def test_torch_thread_count_is_left_alone():
    """numba's OpenMP layer binds to torch's libgomp, and starting it set that library's thread count to every core:
    a one-thread training process ran two. Checked in a fresh process, where the layer has not started yet."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); import normlab.nn as nl; "
            "nl.BatchNorm1d(4)(torch.randn(8, 4, requires_grad=True)).sum().backward(); print(torch.get_num_threads())")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "NORMLAB_BACKEND": "numba"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1"


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 1, 1), (2, 3, 4, 5)])
@pytest.mark.parametrize("memory", ["contiguous", "channels_last"])
def test_output_can_be_modified_in_place(shape, memory, cpu_backend):
    """The next layer may modify the output in place (nn.ReLU(inplace=True)), with the gradient of doing so."""
    x = torch.randn(shape, dtype=torch.float64)
    x = (channels_last(x) if memory == "channels_last" and x.dim() == 4 else x).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    runs = [lambda t, ww: F.batch_norm(t, None, None, ww, None, True),
            lambda t, ww: F.group_norm(t, 1, ww),
            lambda t, ww: F.layer_norm(t, t.shape[1:], ww.repeat(t[0].numel() // 3).reshape(t.shape[1:]))]
    oracles = [lambda t, ww: TF.batch_norm(t, None, None, ww, None, True),
               lambda t, ww: TF.group_norm(t, 1, ww),
               lambda t, ww: TF.layer_norm(t, t.shape[1:], ww.repeat(t[0].numel() // 3).reshape(t.shape[1:]))]
    for run, oracle in zip(runs, oracles):
        grads = []
        for fn in (run, oracle):
            y = torch.relu_(fn(x, w))
            grads.append(torch.autograd.grad(y.sin().sum(), (x, w)))
        for a, b in zip(*grads):
            assert_close(a, b, torch.float64)


def test_stats_function_materializes_no_zero_gradients():
    """The statistics-returning autograd Function (ghost batch norm) gets None, not two allocated zeros, for its
    non-differentiable mean and var."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 3, 5, requires_grad=True)
    call = spec.call("batch", tuple(x.shape), 1e-5, None, "before", 0.01, True, None, None)
    y, _, _ = F._StatsNormFunction.apply(x, None, None, call, torch_ops)
    with Ops() as ops:
        y.backward(torch.ones_like(y))
    assert x.grad is not None and not [n for n in ops.names if n.startswith("zeros")], ops.names
