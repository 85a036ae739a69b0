"""The float64 reference: its hand-derived backward against finite differences and torch.autograd."""

import numpy as np
import pytest
import torch

from normlab import reference as ref
from normlab.spec import plan
from tests.conftest import ACT_PLACEMENTS, TORCH_ACTIVATION

CASES = [
    ("batch", (4, 3, 5), {}),
    ("batch", (7, 2), {}),
    ("instance", (2, 3, 5), {}),
    ("group", (2, 6, 3), {"groups": 3}),
    ("layer", (3, 2, 5), {"normalized_ndim": 2}),
]


def _inputs(p, rng):
    x = rng.normal(size=p.shape) * 1.5 + 0.3
    w = rng.normal(size=p.affine_size)
    b = rng.normal(size=p.affine_size)
    dy = rng.normal(size=p.shape)
    return x, w, b, dy


@pytest.mark.parametrize("kind, shape, kw", CASES)
@pytest.mark.parametrize("activation, placement", ACT_PLACEMENTS)
def test_backward_matches_finite_differences(kind, shape, kw, activation, placement):
    rng = np.random.default_rng(1)
    p = plan(kind, shape, **kw)
    x, w, b, dy = _inputs(p, rng)
    _, cache = ref.forward(x, w, b, 1e-5, p, activation, placement)
    dx, dw, db = ref.backward(dy, cache)

    def loss(x_, w_, b_):
        return float(np.sum(ref.forward(x_, w_, b_, 1e-5, p, activation, placement)[0] * dy))

    h = 1e-6
    for got, arg in ((dx, 0), (dw, 1), (db, 2)):
        args = [x, w, b]
        num = np.zeros_like(args[arg])
        for i in np.ndindex(args[arg].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[arg][i] += h
            minus[arg][i] -= h
            num[i] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(got, num, rtol=1e-5, atol=1e-6, err_msg=f"argument {arg}")


def _torch_norm(xt, wt, bt, p, activation, placement):
    act = (lambda v: v) if activation is None else TORCH_ACTIVATION[activation]()
    a = act(xt) if placement == "after" else xt
    a4 = a.reshape(p.view_shape)
    mean = a4.mean(dim=p.stat_axes, keepdim=True)
    var = ((a4 - mean) ** 2).mean(dim=p.stat_axes, keepdim=True)
    z = (a4 - mean) / torch.sqrt(var + 1e-5) * wt.reshape(1, p.G, p.K, 1) + bt.reshape(1, p.G, p.K, 1)
    return (act(z) if placement == "before" else z).reshape(p.shape)


@pytest.mark.parametrize("kind, shape, kw", CASES)
@pytest.mark.parametrize("activation, placement", ACT_PLACEMENTS)
def test_backward_matches_torch_autograd(kind, shape, kw, activation, placement):
    rng = np.random.default_rng(2)
    p = plan(kind, shape, **kw)
    x, w, b, dy = _inputs(p, rng)
    y, cache = ref.forward(x, w, b, 1e-5, p, activation, placement)
    dx, dw, db = ref.backward(dy, cache)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    yt = _torch_norm(xt, wt, bt, p, activation, placement)
    gx, gw, gb = torch.autograd.grad(yt, (xt, wt, bt), torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    for got, want in ((dx, gx), (dw, gw), (db, gb)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-11)


def test_named_wrappers_share_the_core():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 4, 5))
    w, b = rng.normal(size=4), rng.normal(size=4)
    y_bn, _ = ref.batch_norm_forward(x, w, b)
    y_in, _ = ref.instance_norm_forward(x, w, b)
    y_gn, _ = ref.group_norm_forward(x, 4, w, b)
    np.testing.assert_allclose(y_in, y_gn)  # group norm with C groups is instance norm
    # group norm with one group is layer norm over (C, L), with the per-channel affine broadcast over L
    y_g1, _ = ref.group_norm_forward(x, 1, None, None)
    y_ln, _ = ref.layer_norm_forward(x, 2, None, None)
    np.testing.assert_allclose(y_g1, y_ln)
    assert not np.allclose(y_bn, y_in)
    # per channel, batch norm output has mean 0 and biased variance 1 (up to eps)
    z = (y_bn - b[None, :, None]) / w[None, :, None]
    np.testing.assert_allclose(z.mean(axis=(0, 2)), 0, atol=1e-12)
    np.testing.assert_allclose(z.var(axis=(0, 2)), 1, rtol=1e-3)


def test_inference_transform_is_algorithm_2():
    rng = np.random.default_rng(4)
    batches = [rng.normal(loc=2.0, scale=3.0, size=(8, 3, 4)) for _ in range(5)]
    stats = [ref.batch_stats(bx) for bx in batches]
    means, variances, m = np.stack([s[0] for s in stats]), np.stack([s[1] for s in stats]), stats[0][2]
    mean, var = ref.population_stats(means, variances, m)
    # independently: the average of the batches' own means and unbiased (ddof=1) variances per channel
    per_channel = [bx.transpose(1, 0, 2).reshape(3, -1) for bx in batches]
    np.testing.assert_allclose(mean, np.mean([c.mean(axis=1) for c in per_channel], axis=0))
    np.testing.assert_allclose(var, np.mean([c.var(axis=1, ddof=1) for c in per_channel], axis=0))
    w, b = rng.normal(size=3), rng.normal(size=3)
    x = rng.normal(size=(2, 3, 4))
    y = ref.batch_norm_inference(x, w, b, mean, var, 1e-5)
    want = (x - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5) * w[None, :, None] + b[None, :, None]
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    # batch size 1 at test time is fine: each sample is transformed on its own
    np.testing.assert_allclose(ref.batch_norm_inference(x[:1], w, b, mean, var), y[:1])


def test_running_update():
    np.testing.assert_allclose(ref.running_update([1.0, 2.0], [3.0, 0.0], 0.25), [1.5, 1.5])


def test_unknown_activation_rejected():
    with pytest.raises(ValueError, match="activation must be"):
        ref.batch_norm_forward(np.zeros((2, 2)), None, None, activation="swish")


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5)])
@pytest.mark.parametrize("activation, placement", [(None, "before"), ("tanh", "before"), ("silu", "after")])
def test_batch_renorm_backward_matches_autograd(shape, activation, placement):
    """The paper's backward equations against torch.autograd of the paper's forward with r and d detached, with
    running statistics that clip some channels and not others."""
    rng = np.random.default_rng(0)
    x, w, b, dy = (rng.normal(size=s) for s in (shape, shape[1], shape[1], shape))
    f_np = ref.activation_functions(activation)
    a_np = f_np[0](x) if placement == "after" else x
    var_b = np.moveaxis(a_np, 1, 0).reshape(shape[1], -1).var(1)
    rm, rv = np.array([0.1, 3.0, -0.2]), np.array([var_b[0] * 1.2**2, 0.01, 40.0])  # r ≈ 1/1.2, 1.5, 1/1.5
    y, cache = ref.batch_renorm_forward(x, w, b, rm, rv, 1.5, 0.8, 1e-5, activation, placement)
    dx, dw, db = ref.batch_renorm_backward(dy, cache)
    r = cache[5].reshape(-1)
    assert r[1] == 1.5 and r[2] == 1 / 1.5 and 1 / 1.5 < r[0] < 1.5  # clipped both ways, and free

    xt, wt, bt = (torch.tensor(t, requires_grad=True) for t in (x, w, b))
    f = TORCH_ACTIVATION[activation]() if activation else torch.nn.Identity()
    a = f(xt) if placement == "after" else xt
    dims = [0] + list(range(2, xt.dim()))
    bshape = (1, -1) + (1,) * (xt.dim() - 2)
    mu_b = a.mean(dims, keepdim=True)
    sigma_b = (((a - mu_b) ** 2).mean(dims, keepdim=True) + 1e-5).sqrt()
    sigma = torch.tensor(np.sqrt(rv + 1e-5)).reshape(bshape)
    r_t = (sigma_b / sigma).clamp(1 / 1.5, 1.5).detach()
    d_t = ((mu_b - torch.tensor(rm).reshape(bshape)) / sigma).clamp(-0.8, 0.8).detach()
    z = wt.reshape(bshape) * ((a - mu_b) / sigma_b * r_t + d_t) + bt.reshape(bshape)
    yt = f(z) if placement == "before" else z
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), atol=1e-12)
    for name, got, want in (("dx", dx, xt.grad), ("dw", dw, wt.grad), ("db", db, bt.grad)):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-10, rtol=1e-9, err_msg=name)


def test_ghost_batch_norm_is_batch_norm_per_virtual_batch():
    rng = np.random.default_rng(1)
    x, w, b, dy = rng.normal(size=(7, 2, 3)), rng.normal(size=2), rng.normal(size=2), rng.normal(size=(7, 2, 3))
    y, cache = ref.ghost_batch_norm_forward(x, w, b, 3)
    dx, dw, db = ref.ghost_batch_norm_backward(dy, cache)
    dws, dbs = [], []
    for lo, hi in ((0, 3), (3, 6), (6, 7)):
        yc, cc = ref.batch_norm_forward(x[lo:hi], w, b)
        dxc, dwc, dbc = ref.batch_norm_backward(dy[lo:hi], cc)
        np.testing.assert_allclose(y[lo:hi], yc)
        np.testing.assert_allclose(dx[lo:hi], dxc)
        dws.append(dwc)
        dbs.append(dbc)
    np.testing.assert_allclose(dw, sum(dws))
    np.testing.assert_allclose(db, sum(dbs))
    mean, var = ref.ghost_batch_stats(x, 3)
    chunks = [x[:3], x[3:6], x[6:]]
    np.testing.assert_allclose(mean, sum(c.shape[0] / 7 * c.mean((0, 2)) for c in chunks))
    np.testing.assert_allclose(var, sum(c.shape[0] / 7 * c.transpose(1, 0, 2).reshape(2, -1).var(1, ddof=1)
                                        for c in chunks))
