"""The Triton kernels (normlab.kernels) against the float64 reference, on CPU under TRITON_INTERPRET=1.

Each case runs the forward (training or eval) and the backward through ``normlab.kernels`` and compares y, the
statistics, dx, dw and db with :mod:`normlab.reference` evaluated in float64 on the same (rounded) inputs.
Most cases run with tiny tiles (``TINY``) so that even these small shapes span many tiles, row blocks per program
and merge steps, with masked edges; some run with the default (GPU) tiles.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install normlab[gpu])")

from normlab import kernels, reference, spec, torch_ops  # noqa: E402
from normlab.kernels import launch, norm  # noqa: E402
from normlab.spec import LEAKY_SLOPE, plan  # noqa: E402
from tests.conftest import ACT_PLACEMENTS  # noqa: E402

# name -> (shape, channels_last): primes and size-1 dims in every layout.
LAYOUTS = {
    "NC": ((13, 5), False),
    "NCL": ((3, 5, 7), False),
    "NCHW": ((3, 5, 7, 2), False),
    "NHWC": ((3, 5, 7, 2), True),
    "NCDHW": ((2, 3, 5, 1, 3), False),
    "NDHWC": ((2, 3, 5, 1, 3), True),
    "NCHW-1": ((1, 3, 1, 7), False),
    "NHWC-1": ((2, 1, 5, 3), True),
}

# (atol, rtol) against the float64 reference, for y/dx and for the statistics; dw and db sum over m values, so
# their tolerance is scaled by sqrt(m).
TOL = {
    torch.float32: (2e-5, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

# 2 channels x 8 positions per tile; row path: rows up to 8 values held whole, longer ones in chunks of 4, 2 rows
# per tile.
TINY = launch.Tuning(block_c=2, block_r=8, programs=6, merge_block=2, row_max=8, row_chunk=4, row_block_n=2)


@pytest.fixture
def tiles(request, monkeypatch):
    """Run under the tiling named by the parameter: ``"tiny"`` (many tiles) or ``"default"``."""
    monkeypatch.setattr(launch, "TUNING", TINY if request.param == "tiny" else launch.Tuning())
    return request.param


def _plan(kind, shape, groups=None, normalized_ndim=1):
    """The plan; layer norm normalizes the last ``normalized_ndim`` dims."""
    return plan(kind, shape, groups=groups, normalized_ndim=normalized_ndim if kind == "layer" else None)


def _call(p, eps, activation=None, placement="before", negative_slope=LEAKY_SLOPE, use_input_stats=True):
    """The :class:`~normlab.spec.Call` of plan ``p``, as the library builds it."""
    return spec.call(p.kind, p.shape, eps, activation, placement, negative_slope, use_input_stats,
                     p.G if p.kind == "group" else None, p.normalized_ndim or None)  # fmt: skip


def _make(shape, channels_last, dtype, p, w_dtype=None, affine=(True, True), scale=1.0, offset=0.0):
    x = (torch.randn(shape, dtype=torch.float64) * scale + offset).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    w_dtype = w_dtype or dtype
    w = (torch.rand(p.affine_size, dtype=torch.float64) + 0.5).to(w_dtype) if affine[0] else None
    b = torch.randn(p.affine_size, dtype=torch.float64).to(w_dtype) if affine[1] else None
    dy = torch.randn(shape, dtype=torch.float64).to(dtype)
    return x, w, b, dy


def _np(t):
    return None if t is None else t.detach().to(torch.float64).numpy()


def _close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(
        actual.detach().to(torch.float64).reshape(-1),
        torch.as_tensor(np.asarray(expected, dtype=np.float64)).reshape(-1),
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: {m}",
    )


def _check_rstd(rstd, var, eps, p):
    """The kernels' rstd: float32, ``p.stat_shape``, ``1 / sqrt(var + eps)`` of the variance they return."""
    assert rstd.dtype == torch.float32 and rstd.shape == p.stat_shape
    _close(rstd, (var.double().reshape(p.stat_shape) + eps).rsqrt(), 0.0, 1e-6, "rstd")


def _check_training(x, w, b, dy, p, activation, placement, eps=1e-5, negative_slope=LEAKY_SLOPE):
    """Forward and backward of the kernels against the float64 reference on the same inputs."""
    dtype = x.dtype
    atol, rtol = TOL[dtype]
    call = _call(p, eps, activation, placement, negative_slope)
    y, mean, rstd, var = kernels.forward(x, w, b, call)
    ref_y, cache = reference.forward(_np(x), _np(w), _np(b), eps, p, activation, placement, negative_slope)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous(memory_format=torch_ops.output_format(x, p))
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == p.stat_shape
    _close(y, ref_y, atol, rtol, "y")
    _close(mean, cache[3], 1e-5, 1e-5, "mean")
    _close(var, cache[5], 1e-5, 1e-4, "var")
    _check_rstd(rstd, var, eps, p)
    dx, dw, db = kernels.backward(dy, x, w, b, mean, rstd, call)
    ref_dx, ref_dw, ref_db = reference.backward(_np(dy), cache)
    assert dx.dtype == dtype and dx.is_contiguous(memory_format=torch_ops.output_format(x, p))
    _close(dx, ref_dx, atol * 4, rtol * 4, "dx")
    s = float(np.sqrt(p.m))
    if w is None:
        assert dw is None
    else:
        assert dw.dtype == w.dtype and dw.shape == (p.affine_size,)
        _close(dw, ref_dw, atol * s, rtol * 2, "dw")
    if b is None:
        assert db is None
    else:
        assert db.dtype == b.dtype and db.shape == (p.affine_size,)
        _close(db, ref_db, atol * s, rtol * 2, "db")


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("activation,placement", ACT_PLACEMENTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_batch_norm_float32(tiles, layout, activation, placement):
    shape, cl = LAYOUTS[layout]
    p = plan("batch", shape)
    _check_training(*_make(shape, cl, torch.float32, p), p, activation, placement)


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("activation,placement", [(None, "before"), ("relu", "before"), ("silu", "after")])
@pytest.mark.parametrize(
    "dtype,w_dtype", [(torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)], ids=str
)
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC", "NDHWC"])
def test_batch_norm_half(tiles, layout, dtype, w_dtype, activation, placement):
    """Half-precision input; weight and bias in the input's dtype or float32 (as with AMP)."""
    shape, cl = LAYOUTS[layout]
    p = plan("batch", shape)
    _check_training(*_make(shape, cl, dtype, p, w_dtype=w_dtype), p, activation, placement)


@pytest.mark.parametrize("tiles", ["default"], indirect=True)
@pytest.mark.parametrize("activation,placement", [(None, "before"), ("gelu", "before"), ("tanh", "after")])
@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [
        ("batch", (13, 5), None, False),
        ("batch", (3, 5, 7, 2), None, False),
        ("batch", (3, 5, 7, 2), None, True),
        ("batch", (2, 3, 5, 1, 3), None, False),
        ("group", (3, 6, 5, 7), 3, True),
        ("instance", (3, 5, 7, 2), None, False),
    ],
)
def test_default_tiles(tiles, kind, shape, groups, cl, activation, placement):
    """The tiles the GPU would use (one tile covers these small inputs)."""
    p = plan(kind, shape, groups=groups)
    _check_training(*_make(shape, cl, torch.float32, p), p, activation, placement)


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("activation,placement", [(None, "before"), ("sigmoid", "before")])
def test_batch_norm_without_affine(tiles, affine, activation, placement):
    shape, cl = LAYOUTS["NCHW"]
    p = plan("batch", shape)
    _check_training(*_make(shape, cl, torch.float32, p, affine=affine), p, activation, placement)


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("activation,placement", [(None, "before"), ("silu", "before"), ("leaky_relu", "after")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [
        ("group", (3, 6, 5, 7), 3, False),
        ("group", (3, 6, 5, 7), 3, True),
        ("group", (2, 4, 7), 1, False),
        ("group", (2, 5, 3, 1, 2), 5, True),
        ("instance", (3, 5, 7, 2), None, False),
        ("instance", (3, 5, 7, 2), None, True),
        ("instance", (2, 3, 11), None, False),
        ("group", (7, 13), 1, False),  # one group, R = 1: the row path
    ],
)
def test_group_and_instance_norm(tiles, kind, shape, groups, cl, dtype, activation, placement):
    p = plan(kind, shape, groups=groups)
    _check_training(*_make(shape, cl, dtype, p), p, activation, placement)


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("activation,placement", [(None, "before"), ("relu", "before"), ("gelu", "after")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [
        ("batch", (3, 5, 7, 2), None, False),
        ("batch", (3, 5, 7, 2), None, True),
        ("group", (2, 6, 5), 2, False),
        ("layer", (3, 2, 13), None, False),
    ],
)
def test_eval_forward_and_backward(tiles, kind, shape, groups, cl, dtype, activation, placement):
    """Given (running) statistics: y and the gradients with the statistics as constants, against the torch path
    evaluated in float64 on the same inputs."""
    p = _plan(kind, shape, groups)
    x, w, b, dy = _make(shape, cl, dtype, p, w_dtype=torch.float32)
    n_stats = int(np.prod(p.stat_shape))
    stats = (torch.randn(n_stats), torch.rand(n_stats) + 0.5)
    eps = 1e-3
    call = _call(p, eps, activation, placement, use_input_stats=False)
    y, mean, rstd, var = kernels.forward(x, w, b, call, stats)
    assert torch.equal(mean.reshape(-1), stats[0]) and torch.equal(var.reshape(-1), stats[1])
    assert y.stride() == x.stride() and y.dtype == dtype
    _check_rstd(rstd, var, eps, p)
    x64, w64, b64, dy64 = (t.to(torch.float64) for t in (x, w, b, dy))
    stats64 = tuple(s.to(torch.float64) for s in stats)
    ref_y = torch_ops.forward(x64, w64, b64, call, stats64)[0]
    atol, rtol = TOL[dtype]
    _close(y, ref_y, atol, rtol, "y")
    dx, dw, db = kernels.backward(dy, x, w, b, mean, rstd, call)
    ref = torch_ops.backward(dy64, x64, w64, b64, stats64[0].reshape(p.stat_shape),
                             (stats64[1] + eps).rsqrt().reshape(p.stat_shape), call)  # fmt: skip
    s = float(np.sqrt(p.m))
    _close(dx, ref[0], atol * 4, rtol * 4, "dx")
    _close(dw, ref[1], atol * s, rtol * 2, "dw")
    _close(db, ref[2], atol * s, rtol * 2, "db")


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
def test_eval_instance_norm_channel_stats(tiles):
    """Instance norm with given ``(C,)`` statistics (its running buffers): every sample normalizes with them; rstd
    comes back per sample, ``p.stat_shape``, and the backward takes the ``(C,)`` mean and that rstd."""
    shape = (3, 5, 7, 2)
    p = plan("instance", shape)
    x, w, b, dy = _make(shape, True, torch.float32, p)
    stats = (torch.randn(5), torch.rand(5) + 0.5)
    eps = 1e-3
    call = _call(p, eps, "silu", use_input_stats=False)
    y, mean, rstd, var = kernels.forward(x, w, b, call, stats)
    assert mean is stats[0] and var is stats[1]
    _check_rstd(rstd, var.expand(p.stat_shape), eps, p)
    x64, w64, b64, dy64 = (t.to(torch.float64) for t in (x, w, b, dy))
    stats64 = tuple(s.to(torch.float64) for s in stats)
    _close(y, torch_ops.forward(x64, w64, b64, call, stats64)[0], 2e-5, 1e-4, "y")
    dx, dw, db = kernels.backward(dy, x, w, b, mean, rstd, call)
    ref = torch_ops.backward(dy64, x64, w64, b64, stats64[0], (stats64[1] + eps).rsqrt(), call)
    s = float(np.sqrt(p.m))
    _close(dx, ref[0], 8e-5, 4e-4, "dx")
    _close(dw, ref[1], 2e-5 * s, 2e-4, "dw")
    _close(db, ref[2], 2e-5 * s, 2e-4, "db")


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("placement", ["before", "after"])
@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [
        ("batch", (3, 5, 7, 2), None, True),
        ("group", (3, 6, 5, 7), 3, False),
        ("layer", (3, 2, 5), None, False),  # whole rows
        ("layer", (3, 2, 13), None, False),  # chunked rows
    ],
)
def test_leaky_relu_negative_slope(tiles, kind, shape, groups, cl, placement):
    """leaky_relu with a non-default negative slope, in both placements, against the reference with that slope;
    the default slope gives a different output (the slope reaches the kernels)."""
    p = _plan(kind, shape, groups)
    x, w, b, dy = _make(shape, cl, torch.float32, p)
    _check_training(x, w, b, dy, p, "leaky_relu", placement, negative_slope=0.2)
    y_02 = kernels.forward(x, w, b, _call(p, 1e-5, "leaky_relu", placement, 0.2))[0]
    y_default = kernels.forward(x, w, b, _call(p, 1e-5, "leaky_relu", placement))[0]
    assert not torch.allclose(y_02, y_default)


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("use_input_stats", [True, False])
@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [
        ("batch", (3, 5, 7, 2), None, True),
        ("group", (3, 6, 5), 2, False),
        ("layer", (3, 2, 5), None, False),  # whole rows
        ("layer", (3, 2, 13), None, False),  # chunked rows
    ],
)
def test_backward_without_dx(tiles, kind, shape, groups, cl, use_input_stats):
    """``need_dx=False``: dx is None, dw and db are those of the full backward, bit for bit."""
    p = _plan(kind, shape, groups)
    x, w, b, dy = _make(shape, cl, torch.float32, p)
    call = _call(p, 1e-5, "gelu", use_input_stats=use_input_stats)
    stats = None if use_input_stats else (torch.randn(p.stat_shape), torch.rand(p.stat_shape) + 0.5)
    _, mean, rstd, _ = kernels.forward(x, w, b, call, stats)
    dx, dw, db = kernels.backward(dy, x, w, b, mean, rstd, call)
    none, dw_only, db_only = kernels.backward(dy, x, w, b, mean, rstd, call, need_dx=False)
    assert dx is not None and none is None
    assert torch.equal(dw, dw_only) and torch.equal(db, db_only)


def test_stats_must_match_use_input_stats():
    p = plan("batch", (4, 3, 5))
    x = torch.randn(p.shape)
    stats = (torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="use_input_stats"):
        kernels.forward(x, None, None, _call(p, 1e-5), stats)
    with pytest.raises(ValueError, match="use_input_stats"):
        kernels.forward(x, None, None, _call(p, 1e-5, use_input_stats=False))


def test_running_stats():
    """``forward(..., running=...)`` folds the input's own statistics into the buffers, as torch_ops' update (which
    the kernels module re-exports) does with the returned mean and var."""
    assert kernels.update_running_stats is torch_ops.update_running_stats
    p = plan("batch", (4, 3, 5))
    x = torch.randn(p.shape) * 2 + 1
    running = spec.Running(torch.zeros(3), torch.ones(3), 0.1, torch.zeros((), dtype=torch.long))
    _, mean, _, var = kernels.forward(x, None, None, _call(p, 1e-5), None, running)
    expected = spec.Running(torch.zeros(3), torch.ones(3), 0.1, torch.zeros((), dtype=torch.long))
    torch_ops.update_running_stats(expected, mean, var, p.m)
    for a, c in zip(running, expected):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, c)
    assert running.num_batches_tracked.item() == 1 and not torch.equal(running.mean, torch.zeros(3))


# (shape, normalized_ndim): with TINY, K = 5 and 4 fit one tile, K = 13 and 15 run in chunks of 4.
LAYER_SHAPES = [((7, 13), 1), ((2, 3, 5), 1), ((2, 3, 5), 2), ((1, 4), 1)]


@pytest.mark.parametrize("tiles", ["tiny", "default"], indirect=True)
@pytest.mark.parametrize("activation,placement", [(None, "before"), ("gelu", "before"), ("silu", "after")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,nd", LAYER_SHAPES, ids=str)
def test_layer_norm(tiles, shape, nd, dtype, activation, placement):
    """Layer norm (the row path): whole rows in registers, or chunked rows (TINY, K > 8)."""
    p = plan("layer", shape, normalized_ndim=nd)
    _check_training(*_make(shape, False, dtype, p), p, activation, placement)


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("shape,nd", [((5, 3), 1), ((3, 2, 7), 2)], ids=str)
def test_layer_norm_without_affine(tiles, shape, nd, affine):
    p = plan("layer", shape, normalized_ndim=nd)
    _check_training(*_make(shape, False, torch.float32, p, affine=affine), p, "sigmoid", "before")


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
def test_layer_norm_channels_last(tiles):
    """Layer norm of a channels_last input: values in logical order, y and dx contiguous (as torch gives)."""
    shape = (2, 3, 4, 5)
    p = plan("layer", shape, normalized_ndim=2)
    x, w, b, dy = _make(shape, True, torch.float32, p)
    dy = dy.contiguous(memory_format=torch.channels_last)
    _check_training(x, w, b, dy, p, "relu", "before")


@pytest.mark.parametrize("tiles", ["tiny", "default"], indirect=True)
def test_layer_norm_large_mean_small_spread(tiles):
    """Rows with mean 1e4 and std 1e-2: the variance keeps its precision, in one tile or in chunks."""
    shape = (3, 37)
    p = plan("layer", shape, normalized_ndim=1)
    x, w, b, _ = _make(shape, False, torch.float32, p, scale=1e-2, offset=1e4)
    _, mean, _, var = kernels.forward(x, w, b, _call(p, 1e-8))
    _, cache = reference.forward(_np(x), _np(w), _np(b), 1e-8, p, None, "before")
    ref_var = torch.as_tensor(cache[5]).reshape(-1)
    rel = ((var.reshape(-1).double() - ref_var) / ref_var).abs().max().item()
    assert rel < 1e-3, f"relative variance error {rel}"
    _close(mean, cache[3], 0.0, 1e-7, "mean")


@pytest.mark.parametrize("tiles", ["tiny", "default"], indirect=True)
@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
def test_large_mean_small_spread(tiles, layout):
    """float32 data with mean 1e4 and std 1e-2: the variance keeps its precision (no E[x^2] - E[x]^2)."""
    shape, cl = {"NC": ((64, 3), False), "NCHW": ((4, 3, 5, 4), False), "NHWC": ((4, 3, 5, 4), True)}[layout]
    p = plan("batch", shape)
    x, w, b, dy = _make(shape, cl, torch.float32, p, scale=1e-2, offset=1e4)
    y, mean, _, var = kernels.forward(x, w, b, _call(p, 1e-8, "relu"))
    ref_y, cache = reference.forward(_np(x), _np(w), _np(b), 1e-8, p, "relu", "before")
    ref_var = torch.as_tensor(cache[5]).reshape(-1)
    rel = ((var.reshape(-1).double() - ref_var) / ref_var).abs().max().item()
    assert rel < 1e-3, f"relative variance error {rel}"
    # The one-pass formula in float32 on the same data misses by far more: what this test guards against.
    x4 = torch_ops.view4(x, p)
    naive = (x4 * x4).mean((0, 2, 3)) - x4.mean((0, 2, 3)) ** 2
    assert ((naive.double() - ref_var) / ref_var).abs().max().item() > 1e-1
    # y: rounding the float32 mean (ulp 1e-3 at 1e4, std 1e-2) alone moves xhat by up to ~0.05.
    _close(y, ref_y, 0.1, 0.0, "y")
    _close(mean, cache[3], 0.0, 1e-7, "mean")


@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [("batch", (5, 3, 7, 3), None, True), ("group", (3, 6, 13), 2, False), ("layer", (9, 37), None, False)],
)
def test_deterministic(monkeypatch, kind, shape, groups, cl):
    """Two runs give bit-identical outputs, statistics and gradients (fixed merge order, no atomics)."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    p = _plan(kind, shape, groups)
    x, w, b, dy = _make(shape, cl, torch.float32, p)
    call = _call(p, 1e-5, "silu")
    runs = []
    for _ in range(2):
        y, mean, rstd, var = kernels.forward(x, w, b, call)
        grads = kernels.backward(dy, x, w, b, mean, rstd, call)
        runs.append((y, mean, rstd, var, *grads))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_tiling_does_not_change_results_beyond_rounding(monkeypatch):
    """Tiny and default tiles split the sums differently; both agree with each other to float32 rounding."""
    shape = (6, 4, 9, 5)
    p = plan("batch", shape)
    x, w, b, dy = _make(shape, False, torch.float32, p)
    call = _call(p, 1e-5, "gelu")
    out = {}
    for name, tuning in (("tiny", TINY), ("default", launch.Tuning())):
        monkeypatch.setattr(launch, "TUNING", tuning)
        y, mean, rstd, var = kernels.forward(x, w, b, call)
        out[name] = (y, mean, rstd, var, *kernels.backward(dy, x, w, b, mean, rstd, call))
    for a, c in zip(out["tiny"], out["default"]):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_other_memory_formats():
    """A non-contiguous input is copied once; dy in a different memory format from x is accepted."""
    p = plan("batch", (3, 4, 5, 2))
    base = torch.randn(3, 4, 2, 5)
    x = base.transpose(2, 3)  # neither contiguous nor channels_last
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    call = _call(p, 1e-5, "relu")
    y, mean, rstd, var = kernels.forward(x, w, b, call)
    ref_y, cache = reference.forward(_np(x), _np(w), _np(b), 1e-5, p, "relu", "before")
    _close(y, ref_y, 2e-5, 1e-4, "y")
    xc = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(3, 4, 5, 2)  # contiguous, while xc is channels_last
    dx, dw, db = kernels.backward(dy, xc, w, b, mean, rstd, call)
    ref_dx, ref_dw, ref_db = reference.backward(_np(dy), cache)
    assert dx.stride() == xc.stride()
    _close(dx, ref_dx, 1e-4, 1e-4, "dx")
    _close(dw, ref_dw, 1e-4, 1e-4, "dw")


def test_supports():
    x = torch.randn(4, 3, 5)
    assert kernels.supports(x, plan("batch", x.shape))
    assert kernels.supports(x.half(), plan("group", x.shape, groups=3))
    assert kernels.supports(x.bfloat16(), plan("instance", x.shape))
    assert not kernels.supports(x.double(), plan("batch", x.shape))
    assert kernels.supports(x, plan("layer", x.shape, normalized_ndim=1))
    assert kernels.supports(x.bfloat16(), plan("layer", x.shape, normalized_ndim=2))
    assert kernels.supports(torch.randn(5), plan("layer", (5,), normalized_ndim=1))
    assert not kernels.supports(x.double(), plan("layer", x.shape, normalized_ndim=1))
    assert not kernels.supports(torch.randn(0, 3, 5), plan("batch", (0, 3, 5)))


@pytest.mark.parametrize("tiles", ["tiny"], indirect=True)
def test_torch_compile_fullgraph(tiles, monkeypatch):
    """A layer running on the kernels compiles with fullgraph=True (normlab.functional's custom ops: no graph
    break) and gives the eager results. Compiled with the aot_eager backend: Inductor cannot generate code around
    Triton kernels on CPU, so the Inductor lowering is exercised on GPU only."""
    import normlab.nn as nl

    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    shape = (4, 3, 5, 2)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape)
    eager, layer = nl.BatchNorm2d(3, activation="relu"), nl.BatchNorm2d(3, activation="relu")
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for run in (eager, compiled):
        xi = x.clone().requires_grad_()
        y = run(xi)
        y.backward(dy)
        results.append((y, xi.grad))
    for a, c in zip(*results):
        assert torch.equal(a, c)
    assert results[1][0].stride() == x.stride()
    torch.testing.assert_close(layer.running_var, eager.running_var)


@pytest.mark.parametrize("kind,training", [("batch", True), ("batch", False), ("group", True), ("layer", True)])
def test_through_functional(monkeypatch, kind, training):
    """normlab.functional with NORMLAB_BACKEND=triton (the kernels) matches NORMLAB_BACKEND=torch, output and
    autograd gradients, in training and eval (batch norm)."""
    import normlab.functional as F

    shape = (3, 4, 5, 3)
    x0 = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    affine = (5, 3) if kind == "layer" else (4,)
    w0, b0, dy = torch.rand(affine) + 0.5, torch.randn(affine), torch.randn(shape)
    results = {}
    for name in ("torch", "triton"):
        monkeypatch.setenv("NORMLAB_BACKEND", name)
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        if kind == "batch":
            rm, rv = torch.zeros(4), torch.ones(4)
            y = F.batch_norm(x, rm, rv, w, b, training=training, activation="silu")
            extra = (rm, rv)
        elif kind == "group":
            y = F.group_norm(x, 2, w, b, activation="silu")
            extra = ()
        else:
            y = F.layer_norm(x, (5, 3), w, b, activation="silu")
            extra = ()
        y.backward(dy)
        results[name] = (y, x.grad, w.grad, b.grad, *extra)
    for a, c in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


def test_compiles_for_sm90():
    """Every kernel compiles with Triton's real compiler (TTIR -> cubin) for an H100 (sm_90), without a GPU:
    catches what the interpreter does not check (types of loop-carried values, constexpr branches, layouts)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("this triton was built without the NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "compiled 28 of 28" in run.stdout


def _meta(shape, channels_last=False):
    """An input of ``shape`` on the meta device: sizes without storage, for limits no test could allocate."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device="meta", memory_format=fmt)


@pytest.mark.parametrize(
    "kind,fits,too_big,cl,extra",
    [
        # one sample over 2^31 values (c * s_c in int32)
        ("batch", (1, 1, 2**30), (1, 3, 2**30), False, {}),
        # NHWC folds the batch into the positions: N * H * W over 2^31 (r0 in int32)
        ("batch", (2**14, 4, 256, 256), (2**15, 4, 256, 256), True, {}),
        # (N, C): 128 channels per tile, so more than 65535 * 128 channels overflow the grid's second dimension
        ("batch", (2, 65535 * 128), (2, 65535 * 128 + 1), False, {}),
        # per-sample statistics of many samples: the (3, N, C, T) partials past int32
        ("instance", (2**10, 1024, 1), (2**20, 1024, 1), False, {}),
        # layer norm's (2, P, K) partials of dw, db past int32 (P: one program per row here)
        ("layer", (2, 2**28), (8, 2**28), False, {"normalized_ndim": 1}),
    ],
)
def test_supports_int32_limits(kind, fits, too_big, cl, extra):
    """Inputs whose offsets or grid overflow int32 / CUDA's grid go to the torch path; the largest that fit do not
    (meta tensors: only sizes and strides, nothing allocated)."""
    assert kernels.supports(_meta(fits, cl), plan(kind, fits, **extra))
    assert not kernels.supports(_meta(too_big, cl), plan(kind, too_big, **extra))


def test_supports_expanded_input():
    """A small tensor expanded to a huge logical size is judged by its logical size."""
    shape = (1, 3, 2**30)
    x = torch.zeros(1, 1, 1).expand(shape)
    assert not kernels.supports(x, plan("batch", shape))


class _Launches:
    """Stands in for ``launch.norm``: records every kernel launch (kernel name, arguments, whether it ran inside
    :func:`launch.device_guard`) and runs the real kernel; records the devices the guard was entered with."""

    def __init__(self, monkeypatch):
        self.calls, self.devices, self.depth = [], [], 0
        real = launch.device_guard

        @contextlib.contextmanager
        def guard(device):
            self.devices.append(device)
            self.depth += 1
            try:
                with real(device):
                    yield
            finally:
                self.depth -= 1

        monkeypatch.setattr(launch, "device_guard", guard)
        monkeypatch.setattr(launch, "norm", self)

    def __getattr__(self, name):
        kernel = getattr(norm, name)
        calls = self.calls

        class _Grid:
            def __getitem__(_, grid):
                def run(*args, **kwargs):
                    calls.append((name, args, kwargs, self.depth > 0))
                    return kernel[grid](*args, **kwargs)

                return run

        return _Grid()


# (kind, shape without the batch, groups, channels_last, normalized_ndim)
_SPEC_CASES = [
    ("batch", (5, 3, 2), None, True, None),  # the batch folded into the positions
    ("batch", (5, 3, 2), None, False, None),
    ("group", (6, 7), 3, False, None),  # per-sample statistics: one output row per sample
    ("layer", (2, 13), None, False, 2),  # the row path, chunked
]


def _step(kind, shape, groups, cl, nd, call_kw=None):
    """Forward and backward through ``normlab.kernels`` of one case; returns x."""
    p = plan(kind, shape, groups=groups, normalized_ndim=nd)
    x, w, b, dy = _make(shape, cl, torch.float32, p)
    call = _call(p, 1e-5, "relu")
    _, mean, rstd, _ = kernels.forward(x, w, b, call)
    kernels.backward(dy, x, w, b, mean, rstd, call)
    return x


def test_launches_run_on_the_inputs_device(monkeypatch):
    """Every launch runs inside ``device_guard(x.device)``, which makes a CUDA tensor's device current (Triton
    launches on the current device) and is a no-op on the CPU."""
    guard = launch.device_guard(torch.device("cuda", 1))  # constructing it touches no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch.device_guard(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(launch, "TUNING", TINY)
    rec = _Launches(monkeypatch)
    for kind, rest, groups, cl, nd in _SPEC_CASES:
        _step(kind, (3, *rest), groups, cl, nd)
    assert rec.calls and all(inside for *_, inside in rec.calls)
    assert rec.devices and all(d == torch.device("cpu") for d in rec.devices)


def _binder(kernel, dns=True):
    """Triton's own argument binder of ``kernel`` for sm_90: what keys its cache of compiled variants."""
    jit = pytest.importorskip("triton.runtime.jit")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    kwargs = dict(kernel.kwargs) if dns else {}
    fn = jit.JITFunction(kernel.fn, **kwargs)
    return jit.create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))


def test_batch_size_does_not_recompile(monkeypatch):
    """Two batch sizes (8 and 5, so every count changes its divisibility by 16 and its being 1) launch every kernel
    with the same specialization, the key of Triton's cache of compiled variants: one compilation per kernel.
    Without the kernels' ``do_not_specialize`` the same launches would need more."""
    try:
        from triton.backends import backends
    except ImportError:
        pytest.skip("this triton has no backend registry")
    if "nvidia" not in backends:
        pytest.skip("this triton was built without the NVIDIA backend")
    monkeypatch.setattr(launch, "TUNING", TINY)
    rec = _Launches(monkeypatch)
    keys, plain = {}, {}
    for i, (kind, rest, groups, cl, nd) in enumerate(_SPEC_CASES):
        for n in (8, 5, 1):
            _step(kind, (n, *rest), groups, cl, nd)
        for name, args, kwargs, _ in rec.calls:
            kernel = getattr(norm, name)
            variant = (i, name, tuple(sorted(kwargs.items())))  # the case (layout, shape apart from N) and constexprs
            keys.setdefault(variant, set()).add(repr(_binder(kernel)(*args, **kwargs)[1]))
            plain.setdefault(variant, set()).add(repr(_binder(kernel, dns=False)(*args, **kwargs)[1]))
        rec.calls.clear()
    assert {name for _, name, _ in keys} == {k for k in dir(norm) if k.endswith("_kernel")}
    assert all(len(v) == 1 for v in keys.values()), [k[:2] for k, v in keys.items() if len(v) > 1]
    assert any(len(v) > 1 for v in plain.values())


def test_backward_takes_the_forwards_rstd(monkeypatch):
    """Through normlab.functional, the kernels' backward gets the very rstd their forward computed (not one
    recomputed from the variance), and uses it: another rstd gives another dx."""
    import normlab.functional as F

    monkeypatch.setenv("NORMLAB_BACKEND", "triton")
    seen = {}
    forward, backward = kernels.forward, kernels.backward

    def fwd(*args, **kwargs):
        out = forward(*args, **kwargs)
        seen["forward"] = out[2]
        return out

    def bwd(dy, x, w, b, mean, rstd, *args, **kwargs):
        seen["backward"] = rstd
        return backward(dy, x, w, b, mean, rstd, *args, **kwargs)

    monkeypatch.setattr(kernels, "forward", fwd)
    monkeypatch.setattr(kernels, "backward", bwd)
    x = torch.randn(4, 3, 5, requires_grad=True)
    F.batch_norm(x, None, None, training=True, activation="relu").sum().backward()
    assert seen["backward"] is seen["forward"]
    p = plan("batch", x.shape)
    call = _call(p, 1e-5, use_input_stats=False)
    mean, rstd, dy = torch.zeros(3), torch.ones(3), torch.randn(x.shape)
    dx1 = backward(dy, x.detach(), None, None, mean, rstd, call)[0]
    dx2 = backward(dy, x.detach(), None, None, mean, 2 * rstd, call)[0]
    torch.testing.assert_close(dx2, 2 * dx1)


@pytest.mark.parametrize(
    "kind,shape,groups,cl",
    [
        ("batch", (5, 3, 7, 3), None, True),
        ("group", (3, 6, 13), 2, False),
        ("layer", (25, 13), None, False),  # chunked rows, 3 row blocks per program: the partials are added to
        ("layer", (25, 5), None, False),  # whole rows
    ],
)
def test_scratch_buffers_need_no_zeroing(monkeypatch, kind, shape, groups, cl):
    """Every scratch buffer (partial sums, merged sums) is written before it is read: filled with NaN instead of
    left as allocated, the outputs and gradients are bit for bit the same (layer norm's backward allocates no zeros)."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    p = _plan(kind, shape, groups)
    x, w, b, dy = _make(shape, cl, torch.float32, p)
    call = _call(p, 1e-5, "silu")
    runs = []
    for nan_filled in (False, True):
        if nan_filled:
            monkeypatch.setattr(launch, "_scratch", lambda s, device: torch.full(s, float("nan"), device=device))
        y, mean, rstd, var = kernels.forward(x, w, b, call)
        runs.append((y, mean, rstd, var, *kernels.backward(dy, x, w, b, mean, rstd, call)))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_host_integer_math_matches_triton():
    """launch's plain-integer cdiv and next power of 2 (no Triton call on the host) agree with Triton's."""
    import triton

    assert all(launch._pow2(v) == triton.next_power_of_2(max(v, 1)) for v in range(-2, 5000))
    assert all(launch._cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 40))


def test_launch_plan_cached(monkeypatch):
    """The launch plan is computed once per (shape, layout, groups, device, TUNING): a second step of the same
    shape only looks it up; a new TUNING is a new plan."""
    monkeypatch.setattr(launch, "TUNING", TINY)
    launch._cached_plan.cache_clear()
    shape = (4, 3, 5)
    p = plan("batch", shape)
    x, w, b, dy = _make(shape, False, torch.float32, p)
    for _ in range(2):
        _, mean, rstd, _ = kernels.forward(x, w, b, _call(p, 1e-5))
        kernels.backward(dy, x, w, b, mean, rstd, _call(p, 1e-5))
    info = launch._cached_plan.cache_info()
    assert info.misses == 1 and info.hits >= 3
    monkeypatch.setattr(launch, "TUNING", launch.Tuning())
    kernels.forward(x, w, b, _call(p, 1e-5))
    assert launch._cached_plan.cache_info().misses == 2
