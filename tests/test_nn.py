"""normlab.nn against torch.nn: outputs, every gradient and the running buffers, layer by layer."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normlab.nn as nl
from tests.conftest import (
    CHANNELS_LAST_SHAPES,
    DTYPES,
    SHAPES,
    SPATIAL_SHAPES,
    TORCH_ACTIVATION,
    assert_close,
    channels_last,
)

BN = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}
IN = {3: "InstanceNorm1d", 4: "InstanceNorm2d", 5: "InstanceNorm3d"}


def _pair(name, *args, dtype=torch.float32, **kw):
    """normlab's layer in ``dtype`` and torch.nn's with the same state. For bfloat16 the torch layer runs in float64
    on the same (rounded) values: torch's CPU bfloat16 batch norm was itself off by up to 1.19 on 2-value channels
    (README, Tests), so it is no oracle there, while normlab keeps float32 statistics and rounds once."""
    ours = getattr(nl, name)(*args, dtype=dtype, **kw)
    theirs = getattr(torch.nn, name)(*args, dtype=dtype, **kw)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))  # non-trivial affine parameters
    ours.load_state_dict(theirs.state_dict())
    return ours, (theirs.double() if dtype == torch.bfloat16 else theirs)


def _step(ours, theirs, x, dtype, what):
    """One forward and backward through both layers; compare outputs and every gradient."""
    oracle_dtype = torch.float64 if dtype == torch.bfloat16 else x.dtype
    xa = x.clone().requires_grad_()
    xb = x.to(oracle_dtype).requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.dtype == x.dtype and yb.dtype == oracle_dtype and ya.shape == yb.shape
    assert ya.is_contiguous(memory_format=torch.channels_last) == yb.is_contiguous(memory_format=torch.channels_last)
    assert_close(ya, yb, dtype, what=f"{what} y")
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy.to(oracle_dtype))
    assert_close(xa.grad, xb.grad, dtype, scale=2, what=f"{what} dx")
    for (name, pa), pb in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(pa.grad, pb.grad, dtype, scale=4 * (1 + x.numel() ** 0.5 / 4), what=f"{what} d{name}")


def _buffers_match(ours, theirs, dtype, what):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert_close(a[k], b[k], dtype, what=f"{what} {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}: {a[k]} != {b[k]}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_matches_torch(shape, dtype, affine, track, momentum):
    ours, theirs = _pair(BN[len(shape)], shape[1], affine=affine, track_running_stats=track, momentum=momentum,
                         dtype=dtype)
    for step in range(3):
        x = (torch.randn(shape) * 2 + step).to(dtype)
        _step(ours, theirs, x, dtype, f"train step {step}")
        _buffers_match(ours, theirs, dtype, f"after step {step}")
    ours.eval()
    theirs.eval()
    _step(ours, theirs, torch.randn(shape).to(dtype), dtype, "eval")
    _buffers_match(ours, theirs, dtype, "eval")


@pytest.mark.parametrize("shape", CHANNELS_LAST_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batchnorm_channels_last(shape, dtype):
    ours, theirs = _pair(BN[len(shape)], shape[1], dtype=dtype)
    for _ in range(2):
        _step(ours, theirs, channels_last(torch.randn(shape).to(dtype)), dtype, "channels_last train")
    _buffers_match(ours, theirs, dtype, "channels_last")
    ours.eval()
    theirs.eval()
    _step(ours, theirs, channels_last(torch.randn(shape).to(dtype)), dtype, "channels_last eval")


def test_batchnorm_half_input_float32_parameters():
    """As under autocast: bf16 activations, float32 weight and running statistics."""
    ours, theirs = _pair("BatchNorm2d", 3)
    theirs = theirs.double()
    x = torch.randn(4, 3, 5, 7).to(torch.bfloat16)
    _step(ours, theirs, x, torch.bfloat16, "mixed")
    _buffers_match(ours, theirs, torch.float32, "mixed")


@pytest.mark.parametrize("shape", SPATIAL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine, track", [(False, False), (True, False), (True, True)])
def test_instancenorm_matches_torch(shape, dtype, affine, track):
    ours, theirs = _pair(IN[len(shape)], shape[1], affine=affine, track_running_stats=track, dtype=dtype)
    for _ in range(2):
        _step(ours, theirs, torch.randn(shape).to(dtype), dtype, "train")
    _buffers_match(ours, theirs, dtype, "instance")
    ours.eval()
    theirs.eval()
    _step(ours, theirs, torch.randn(shape).to(dtype), dtype, "eval")
    _step(ours, theirs, torch.randn(shape[1:]).to(dtype), dtype, "unbatched")


@pytest.mark.parametrize("shape, groups", [((4, 6, 5, 7), 3), ((2, 6, 5), 6), ((3, 6, 5), 1), ((2, 5, 1, 3), 5),
                                           ((1, 4, 3, 2, 3), 2), ((7, 4), 2)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_groupnorm_matches_torch(shape, groups, dtype, affine):
    ours, theirs = _pair("GroupNorm", groups, shape[1], affine=affine, dtype=dtype)
    _step(ours, theirs, torch.randn(shape).to(dtype), dtype, "group")
    if len(shape) == 4:
        _step(ours, theirs, channels_last(torch.randn(shape).to(dtype)), dtype, "group channels_last")


@pytest.mark.parametrize("shape, normalized", [((4, 7), (7,)), ((2, 3, 5), (3, 5)), ((3, 1, 5), (5,)), ((5,), (5,)),
                                               ((2, 3, 4, 5), (4, 5))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_layernorm_matches_torch(shape, normalized, dtype, affine, bias):
    ours, theirs = _pair("LayerNorm", normalized, elementwise_affine=affine, bias=bias, dtype=dtype)
    _step(ours, theirs, torch.randn(shape).to(dtype), dtype, "layer")


@pytest.mark.parametrize("normalized", [(5,), (4, 5), (3, 4, 5)])
def test_layernorm_channels_last_input(normalized):
    """Read in logical order; the output is contiguous, as torch's."""
    ours, theirs = _pair("LayerNorm", normalized, dtype=torch.float64)
    _step(ours, theirs, channels_last(torch.randn(2, 3, 4, 5, dtype=torch.float64)), torch.float64, "layer cl")


@pytest.mark.parametrize("name, args", [("BatchNorm2d", (3,)), ("InstanceNorm2d", (3,)), ("GroupNorm", (3, 3)),
                                        ("LayerNorm", ((3, 4, 5),))])
@pytest.mark.parametrize("activation", list(TORCH_ACTIVATION))
@pytest.mark.parametrize("placement", ["before", "after"])
def test_fused_activation_equals_composition(name, args, activation, placement):
    act = TORCH_ACTIVATION[activation]()
    fused = getattr(nl, name)(*args, activation=activation, placement=placement, dtype=torch.float64)
    plain = getattr(torch.nn, name)(*args, dtype=torch.float64)
    plain.load_state_dict(fused.state_dict())
    composed = torch.nn.Sequential(plain, act) if placement == "before" else torch.nn.Sequential(act, plain)
    _step(fused, composed, torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.float64, f"{activation} {placement}")
    assert repr(fused).endswith(f"activation='{activation}', placement='{placement}')")


@pytest.mark.parametrize("name, args, shape", [("BatchNorm1d", (3,), (4, 3, 2)), ("BatchNorm2d", (2,), (3, 2, 2, 3)),
                                               ("InstanceNorm1d", (3,), (2, 3, 4)), ("GroupNorm", (2, 4), (2, 4, 3)),
                                               ("LayerNorm", ((2, 3),), (2, 2, 3))])
def test_gradcheck(name, args, shape):
    kw = {"affine": True, "track_running_stats": True} if name.startswith("Instance") else {}
    layer = getattr(nl, name)(*args, dtype=torch.float64, activation="silu", **kw)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))
    if layer.state_dict().get("running_mean") is not None:
        layer.eval()  # running statistics: constants of the graph
        assert torch.autograd.gradcheck(layer, (x,))
        assert torch.autograd.gradgradcheck(layer, (x,))


def test_state_dict_round_trip_with_torch():
    theirs = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                 torch.nn.GroupNorm(2, 4), torch.nn.InstanceNorm2d(4, affine=True,
                                                                                   track_running_stats=True))
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nl.BatchNorm2d(4), torch.nn.ReLU(), nl.GroupNorm(2, 4),
                               nl.InstanceNorm2d(4, affine=True, track_running_stats=True))
    for _ in range(3):
        theirs(torch.randn(5, 3, 8, 8))
    ours.load_state_dict(theirs.state_dict())  # strict: identical keys
    theirs.eval()
    ours.eval()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))
    back = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.GroupNorm(2, 4), torch.nn.InstanceNorm2d(4, affine=True,
                                                                                  track_running_stats=True)).eval()
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), theirs(x))
    assert isinstance(ours[1], torch.nn.BatchNorm2d)


def test_non_finite_batch_leaves_running_stats_untouched(cpu_backend):
    ours, theirs = _pair("BatchNorm1d", 3)
    ours(torch.randn(8, 3))
    theirs(torch.randn(8, 3))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    bad = torch.randn(8, 3)
    bad[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        ours(bad)
    theirs(bad)
    assert torch.isnan(theirs.running_mean).any()  # what torch does
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked included: the batch was not folded in
    assert int(ours.num_skipped_updates) == 1
    assert "num_skipped_updates" not in ours.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warns once only
        ours(bad)
    assert int(ours.num_skipped_updates) == 2
    inf = torch.full((8, 3), 3e38)
    inf[::2] *= -1  # finite input whose variance overflows float32
    ours(inf)
    assert int(ours.num_skipped_updates) == 3 and torch.isfinite(ours.running_var).all()


def test_batch_size_one():
    layer = nl.BatchNorm1d(4)
    layer(torch.randn(16, 4))
    layer.eval()
    y = layer(torch.randn(1, 4))  # eval: fine
    assert y.shape == (1, 4)
    layer.train()
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*\[1, 4\]"):
        layer(torch.randn(1, 4))
    nl.BatchNorm2d(4)(torch.randn(1, 4, 2, 2))  # one sample, several positions: fine in training


@pytest.mark.parametrize("momentum", [0.1, None])
def test_zero_size_batch_matches_torch(momentum):
    ours, theirs = _pair("BatchNorm2d", 3, momentum=momentum)
    for x in (torch.randn(0, 3, 4, 4), torch.randn(5, 3, 4, 4) + 1):  # empty, then a real batch
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.shape == yb.shape == x.shape
        ya.sum().backward()
        yb.sum().backward()
        assert xa.grad.shape == x.shape
        torch.testing.assert_close(xa.grad, xb.grad)
        _buffers_match(ours, theirs, torch.float32, f"after a batch of {len(x)}")


@pytest.mark.parametrize(
    "make, x, err, match",
    [
        (lambda: nl.BatchNorm2d(3), torch.randn(2, 3, 4), ValueError, "expected 4D input"),
        (lambda: nl.BatchNorm2d(3), torch.randn(2, 5, 4, 4), ValueError, r"expects 3 channels.*\(2, 5, 4, 4\)"),
        (lambda: nl.BatchNorm1d(3), torch.ones(2, 3, dtype=torch.long), TypeError, "floating-point input.*int64"),
        (lambda: nl.BatchNorm1d(3, eps=0.0), torch.randn(2, 3), ValueError, "BatchNorm1d: eps must be > 0"),
        (lambda: nl.GroupNorm(2, 4), torch.randn(2, 3, 5), ValueError, r"GroupNorm\(2, 4\) expects input"),
        (lambda: nl.LayerNorm(5), torch.randn(2, 4), ValueError, "must end in normalized_shape"),
        (lambda: nl.BatchNorm1d(3, activation="swish"), None, ValueError, "activation must be"),
        (lambda: nl.BatchNorm1d(3, placement="middle"), None, ValueError, "placement must be"),
    ],
)
def test_bad_input(make, x, err, match):
    with pytest.raises(err, match=match):
        make()(x)


LAYERS = [("BatchNorm1d", (3,)), ("BatchNorm2d", (3,)), ("BatchNorm3d", (3,)), ("InstanceNorm1d", (3,)),
          ("InstanceNorm2d", (3,)), ("InstanceNorm3d", (3,)), ("GroupNorm", (1, 3)), ("LayerNorm", (3,))]


@pytest.mark.parametrize("name, args", LAYERS)
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"placement": "after"}, r"placement='after' \(the norm after an activation\) needs an activation"),
        ({"eps": 0.0}, r"eps must be > 0, got 0.0"),
        ({"eps": float("nan")}, r"eps must be > 0, got nan"),
        ({"activation": "relu", "negative_slope": 0.2}, r"negative_slope applies to activation='leaky_relu' only"),
    ],
)
def test_constructor_checks_name_the_layer(name, args, kw, match):
    """Bad settings fail when the layer is built (not at its first forward), and the message names the layer."""
    with pytest.raises(ValueError, match=f"^{name}: {match}"):
        getattr(nl, name)(*args, **kw)


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "InstanceNorm1d"])
@pytest.mark.parametrize("momentum", [1.5, -0.1, float("nan"), "0.1"])
def test_momentum_outside_unit_interval_raises(name, momentum):
    """torch.nn accepts any momentum; a running average needs one in [0, 1] (None: cumulative, for batch norm)."""
    getattr(torch.nn, name)(3, momentum=momentum)  # torch does not object
    with pytest.raises(ValueError, match=rf"^{name}: momentum must be None or a number in \[0, 1\]"):
        getattr(nl, name)(3, momentum=momentum)
    getattr(nl, name)(3, momentum=0.0)
    getattr(nl, name)(3, momentum=1)


@pytest.mark.parametrize("name, args", [("BatchNorm2d", (3,)), ("GroupNorm", (3, 3)), ("LayerNorm", ((3, 4, 5),))])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_leaky_relu_slope(name, args, placement):
    """negative_slope reaches every tier: the fused layer equals torch's norm composed with LeakyReLU(0.2)."""
    fused = getattr(nl, name)(*args, activation="leaky_relu", placement=placement, negative_slope=0.2,
                              dtype=torch.float64)
    plain = getattr(torch.nn, name)(*args, dtype=torch.float64)
    plain.load_state_dict(fused.state_dict())
    act = torch.nn.LeakyReLU(0.2)
    composed = torch.nn.Sequential(plain, act) if placement == "before" else torch.nn.Sequential(act, plain)
    _step(fused, composed, torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.float64, f"leaky 0.2 {placement}")
    assert "negative_slope=0.2" in repr(fused)


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="divisible"):
        nl.GroupNorm(4, 6)


def test_kind_equivalences():
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64)
    gn1 = nl.GroupNorm(1, 6, affine=False, dtype=torch.float64)
    ln = nl.LayerNorm((6, 4, 5), elementwise_affine=False, dtype=torch.float64)
    torch.testing.assert_close(gn1(x), ln(x))
    gnc = nl.GroupNorm(6, 6, affine=False, dtype=torch.float64)
    inorm = nl.InstanceNorm2d(6, dtype=torch.float64)
    torch.testing.assert_close(gnc(x), inorm(x))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6), c=st.integers(1, 4), length=st.integers(1, 7),
    loc=st.floats(-100, 100), scale=st.floats(0.01, 100), seed=st.integers(0, 2**16),
)
def test_train_output_is_standardized(n, c, length, loc, scale, seed):
    if n * length < 2:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64) * scale + loc
    y = nl.BatchNorm1d(c, affine=False, eps=1e-5, dtype=torch.float64)(x)
    m = n * length
    var = x.var(dim=(0, 2), unbiased=False)
    want = var / (var + 1e-5)  # biased variance of y is var / (var + eps): 1 up to eps
    torch.testing.assert_close(y.mean(dim=(0, 2)), torch.zeros(c, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.var(dim=(0, 2), unbiased=False), want, atol=1e-9 * m, rtol=1e-9)
