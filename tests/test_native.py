"""normlab.native, the C++ CPU norm: work split into many chunks, thread-count independence, double backward,
the running update, and what happens where it cannot be built. (Every functional test also runs on it: it is one
of conftest's CPU_BACKENDS.)"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

import normlab.functional as F
import normlab.nn as nl
from normlab import backend, native, reference, spec
from tests.conftest import channels_last


@pytest.fixture(autouse=True)
def _native(monkeypatch):
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the native kernels cannot be built here")
    assert native.available(), "a C++ compiler is here, yet the native kernels did not build (see the warning)"
    monkeypatch.setenv("NORMLAB_BACKEND", "native")


# Inputs of more than one chunk (16,384 values each, at most 64 per block), in both loop families: rows of
# contiguous channels ((N, C) batch norm, channels_last) and planes (contiguous (N, C, *S), layer norm's rows).
BIG = [("batch", (700, 96), {}), ("batch", (6, 16, 30, 31), {}), ("batch", (6, 16, 30, 31), {"cl": True}),
       ("instance", (5, 8, 61, 67), {}), ("instance", (3, 8, 61, 67), {"cl": True}),
       ("group", (4, 12, 40, 41), {"groups": 3}), ("group", (4, 12, 40, 41), {"groups": 3, "cl": True}),
       ("layer", (1030, 70), {})]


def _run(kind, shape, kw, x, w, b, activation=None, placement="before"):
    if kw.get("cl"):
        x = channels_last(x)
    if kind == "batch":
        return F.batch_norm(x, None, None, w, b, True, activation=activation, placement=placement)
    if kind == "instance":
        return F.instance_norm(x, weight=w, bias=b, activation=activation, placement=placement)
    if kind == "group":
        return F.group_norm(x, kw["groups"], w, b, activation=activation, placement=placement)
    return F.layer_norm(x, shape[-1:], w, b, activation=activation, placement=placement)


@pytest.mark.parametrize("kind, shape, kw", BIG)
@pytest.mark.parametrize("activation, placement", [(None, "before"), ("gelu", "before"), ("leaky_relu", "after")])
def test_many_chunks_match_the_torch_path(kind, shape, kw, activation, placement, monkeypatch):
    """float64, against the torch path (itself tested against the float64 reference): y, dx, dw, db to 1e-9."""
    c = shape[-1] if kind == "layer" else shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(shape, dtype=torch.float64)
    out = {}
    for path in ("native", "torch"):
        monkeypatch.setenv("NORMLAB_BACKEND", path)
        y = _run(kind, shape, kw, x, w, b, activation, placement)
        out[path] = (y, *torch.autograd.grad(y, (x, w, b), dy))
    for name, a, e in zip(("y", "dx", "dw", "db"), out["native"], out["torch"]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")
    assert out["native"][0].is_contiguous(memory_format=torch.channels_last) == bool(kw.get("cl"))


def test_results_do_not_depend_on_the_thread_count():
    """The chunks and their merge order depend on the shape only: 1 and 2 threads give the same bits; so does the
    eval with given statistics, whose apply is split over the threads (also on (256, 100), one chunk)."""
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kind, shape, kw in [*BIG, ("batch", (256, 100), {})]:
                torch.manual_seed(0)
                c = shape[-1] if kind == "layer" else shape[1]
                x = torch.randn(shape, requires_grad=True)
                w, b = torch.rand(c, requires_grad=True), torch.randn(c, requires_grad=True)
                y = _run(kind, shape, kw, x, w, b, "silu")
                results.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))
                if kind in ("batch", "instance"):  # eval: the running statistics normalize
                    rm, rv = torch.randn(c), torch.rand(c) + 0.5
                    xe = channels_last(x) if kw.get("cl") else x
                    if kind == "batch":
                        y = F.batch_norm(xe, rm, rv, w, b, False, activation="silu")
                    else:
                        y = F.instance_norm(xe, rm, rv, w, b, use_input_stats=False, activation="silu")
                    results.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))
    finally:
        torch.set_num_threads(before)
    half = len(results) // 2
    for one, two in zip(results[:half], results[half:]):
        for a, b_ in zip(one, two):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("shape, kw", [((300, 37), {}), ((60, 100), {}), ((7, 3, 5, 20), {"cl": True}),
                                       ((40, 768), {"layer": True})])
@pytest.mark.parametrize("activation", ["sigmoid", "gelu", "tanh", "silu", "leaky_relu"])
@pytest.mark.parametrize("need", ["all", "x", "w"])
def test_float32_lanes_match_the_torch_path(shape, kw, activation, need, monkeypatch):
    """float32 rows in float32 lanes (whole vectors, the last one overlapping; dz kept in dx between the backward's
    passes), against the torch path: y, dx, dw, db to float32's tolerances, whichever gradients are asked for."""
    kind = "layer" if kw.get("layer") else "batch"
    c = shape[-1] if kind == "layer" else shape[1]
    x = (torch.randn(shape) * 2 + 3).requires_grad_(need in ("all", "x"))
    w = (torch.rand(c) + 0.5).requires_grad_(need in ("all", "w"))
    b = torch.randn(c, requires_grad=need == "all")
    dy = torch.randn(shape)
    out = {}
    for path in ("native", "torch"):
        monkeypatch.setenv("NORMLAB_BACKEND", path)
        y = _run(kind, shape, kw, x, w, b, activation)
        wrt = [t for t in (x, w, b) if t.requires_grad]
        out[path] = (y, *torch.autograd.grad(y, wrt, dy))
    for a, e in zip(out["native"], out["torch"]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def _hard_float32(shape, case, dim):
    """float32 data on which float32 sums lose digits unless they are centred: ``large_mean`` (mean 1e4, std 1e-2),
    ``outlier`` (each statistic's first value 1e4 standard deviations out), ``drift`` (the mean moves from 0 to 1e3
    along ``dim``, so the first rows or values say nothing of the rest)."""
    x = torch.randn(shape, dtype=torch.float64)
    if case == "large_mean":
        x = x * 1e-2 + 1e4
    elif case == "outlier":
        x.view(-1)[0] = 1e4
        x.select(dim, 0).fill_(1e4)
    else:
        steps = torch.linspace(0, 1e3, shape[dim], dtype=torch.float64)
        x = x + steps.view([-1 if i == dim else 1 for i in range(len(shape))])
    return x.float()


# float32 inputs whose statistics take each of the C++ paths: layer norm's rows (one block, and more than one of
# 4,096 values), group and instance norm's units, (N, C) batch norm's rows in tiles of 32 and chunks, channels_last
# (per-sample and pooled), pooled planes.
HARD = [("layer", (40, 300), {}, 0), ("layer", (3, 10000), {}, 1), ("group", (4, 12, 9, 11), {"groups": 3}, 2),
        ("instance", (3, 5, 37, 41), {}, 2), ("batch", (700, 24), {}, 0), ("batch", (100, 3, 5, 7), {"cl": True}, 0),
        ("instance", (3, 4, 20, 21), {"cl": True}, 2), ("batch", (8, 3, 300), {}, 2)]


@pytest.mark.parametrize("kind, shape, kw, dim", HARD)
@pytest.mark.parametrize("case", ["large_mean", "outlier", "drift"])
def test_float32_statistics_keep_their_digits(kind, shape, kw, dim, case):
    """float32 statistics (float32 lanes, centred sums, merged moments) against the float64 reference: the output
    to 1e-5 of a standard deviation (plus a few float32 roundings of its own size: an outlier's is ~100), dx to 1e-5
    of its largest value."""
    x = _hard_float32(shape, case, dim).requires_grad_()
    p = spec.plan(kind, shape, groups=kw.get("groups"), normalized_ndim=1 if kind == "layer" else None)
    y_ref, cache = reference.forward(x.detach().double().numpy(), None, None, 1e-5, p)
    y = _run(kind, shape, kw, x, None, None)
    torch.testing.assert_close(y.double(), torch.tensor(y_ref), atol=1e-5, rtol=5e-7)
    dy = torch.randn(shape)
    dx = torch.autograd.grad(y, x, dy)[0]
    dx_ref = torch.tensor(reference.backward(dy.double().numpy(), cache)[0])
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5 * dx_ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("kind, shape, kw", [("batch", (5, 3), {}), ("batch", (3, 2, 2, 3), {"cl": True}),
                                             ("instance", (2, 3, 5), {}), ("group", (2, 4, 3), {"groups": 2}),
                                             ("layer", (3, 6), {})])
@pytest.mark.parametrize("activation, placement", [(None, "before"), ("tanh", "before"), ("sigmoid", "after")])
def test_double_backward(kind, shape, kw, activation, placement):
    """The node's backward, asked for a graph, differentiates ATen's ops: second derivatives by finite differences."""
    c = shape[-1] if kind == "layer" else shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: _run(kind, shape, kw, x, w, b, activation, placement)
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_the_node_behaves_as_autograds_own():
    """The C++ node keeps autograd's contracts: a second backward without retain_graph is an error and with it gives
    the same gradients; an input changed in place after the forward is an error at the backward; saved-tensor hooks
    see what it saves; a gradient asked for w alone is dw; forward-mode AD and torch.func are refused."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 4, dtype=torch.float64)
    y = F.batch_norm(x, None, None, w, b, True, activation="tanh")
    assert y.grad_fn.name() == "NormBackward"  # the C++ node, not a Python Function
    first = torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
    again = torch.autograd.grad(y, (x, w, b), dy)
    for g1, g2 in zip(first, again):
        assert torch.equal(g1, g2)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(y, (x, w, b), dy)
    y_ref = torch.tanh(torch.nn.functional.batch_norm(x, None, None, w, b, True))
    torch.testing.assert_close(first, torch.autograd.grad(y_ref, (x, w, b), dy))
    (dw,) = torch.autograd.grad(F.batch_norm(x, None, None, w, b, True, activation="tanh"), w, dy)
    torch.testing.assert_close(dw, first[1])

    xc = x.detach().clone().requires_grad_()
    h = xc * 1  # a non-leaf input, then changed in place
    y = F.batch_norm(h, None, None, w, b, True)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)

    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        y = F.batch_norm(x, None, None, w, b, True)
    assert (6, 4) in packed
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                               torch.autograd.grad(torch.nn.functional.batch_norm(x, None, None, w, b, True), x, dy)[0])

    # sigmoid and tanh save their output, as torch's do: changing it in place before the backward is torch's error
    for activation in ("sigmoid", "tanh"):
        y = F.batch_norm(x, None, None, w, b, True, activation=activation)
        y_ref = getattr(torch, activation)(torch.nn.functional.batch_norm(x, None, None, w, b, True))
        torch.testing.assert_close(torch.autograd.grad(y, (x, w, b), dy, retain_graph=True),
                                   torch.autograd.grad(y_ref, (x, w, b), dy))
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(dy)

    import torch.autograd.forward_ad as fwad

    with fwad.dual_level(), pytest.raises(RuntimeError, match="forward-mode AD"):
        F.batch_norm(fwad.make_dual(x, torch.ones_like(x)), None, None, w, b, True)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda t: F.batch_norm(t, None, None, w, b, True).sum())(x)


@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_compiled_autograd_calls_the_node(activation):
    """Compiled autograd over an eager forward: the node is one opaque call in its graph, with eager's gradients."""
    from torch._dynamo import compiled_autograd

    bn = nl.BatchNorm1d(4, activation=activation).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(bn(x).sin().sum(), (x, bn.weight, bn.bias))
    with compiled_autograd._enable(torch.compile(backend="eager")):
        bn(x).sin().sum().backward()
    torch.testing.assert_close((x.grad, bn.weight.grad, bn.bias.grad), want)


def test_eval_uses_the_given_statistics_and_keeps_the_digits():
    """Eval: (x - running_mean) is taken in float64 inside, so a large mean keeps the output's digits (float32)."""
    bn = nl.BatchNorm1d(4).eval()
    x = (torch.randn(64, 4, dtype=torch.float64) * 1e-2 + 1e4).float()
    bn.running_mean.copy_(x.double().mean(0).float())
    bn.running_var.copy_(x.double().var(0).float())
    with torch.no_grad():
        y = bn(x)
    want = (x.double() - bn.running_mean.double()) / (bn.running_var.double() + bn.eps).sqrt()
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=0)


def test_running_update_guard_and_cumulative_average():
    bn = nl.BatchNorm2d(3, momentum=None)
    x = torch.randn(4, 3, 2, 2)
    bn(x)
    bn(x * 2 + 1)
    want_var = (x.var((0, 2, 3)) + (x * 2 + 1).var((0, 2, 3))) / 2
    torch.testing.assert_close(bn.running_var, want_var)
    assert int(bn.num_batches_tracked) == 2
    before = (bn.running_mean.clone(), bn.running_var.clone())
    with pytest.warns(RuntimeWarning, match="non-finite"):
        bn(torch.full((4, 3, 2, 2), float("inf")))
        bn.eval()
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == 2 and int(bn.num_skipped_updates) == 1


def test_a_finished_build_loads_without_the_build_lock(tmp_path):
    """A lock left by a process killed outright (torch's build lock) does not make the next load wait: a finished
    build of the same source is loaded directly."""
    directory = native._build_directory(native._SOURCE.read_bytes())
    lock = directory / "lock"
    lock.touch()
    try:
        native._extension.cache_clear()
        assert native.available()
    finally:
        lock.unlink(missing_ok=True)
        native._extension.cache_clear()


def test_cumulative_average_needs_the_counter():
    x = torch.randn(4, 3)
    call = spec.call("batch", x.shape, 1e-5)
    running = spec.Running(torch.zeros(3), torch.ones(3), None)
    with pytest.raises(RuntimeError, match="momentum=None .* needs num_batches_tracked"):
        native.norm(x, None, None, call, None, running)


def test_what_it_refuses():
    call = spec.call("batch", (4, 3), 1e-5)
    x = torch.randn(4, 3)
    assert native.supports(x, call)
    assert not native.supports(x.bfloat16(), call)
    assert not native.supports(x[:0], spec.call("batch", (0, 3), 1e-5))
    assert not native.supports(x, call, w=torch.ones(3, dtype=torch.float64))  # weight in another dtype
    running = spec.Running(torch.zeros(6)[::2], torch.ones(3), 0.1)
    assert not native.supports(x, call, running=running)  # a strided running buffer (updated in place)


def test_strided_weight_and_other_devices():
    """A strided weight, bias or given statistic is made contiguous on the C++ side (gradients still reach it);
    a tensor on another device is an error naming it, as torch's own is."""
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(6, dtype=torch.float64)[::2], torch.rand(6, dtype=torch.float64)[::2] + 0.5
    for training in (True, False):
        y = F.batch_norm(x, rm.clone() if training else rm, rv.clone() if training else rv, w[::2], b, training)
        # torch's reference with a contiguous weight: torch 2.13's own CPU backward in eval reads a strided weight as
        # if it were contiguous (its dx then takes w[0], w[1], w[2] for w[::2]'s w[0], w[2], w[4])
        y_ref = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w[::2].contiguous(), b, training)
        torch.testing.assert_close(y, y_ref)
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w), torch.ones_like(y))
        torch.testing.assert_close(gx, gx_ref)
        torch.testing.assert_close(gw, gw_ref)
    meta = torch.ones(3, dtype=torch.float64, device="meta")
    with pytest.raises(RuntimeError, match="expected weight on the CPU"):
        F.batch_norm(x, None, None, meta, b, True)


def test_without_a_build_the_other_paths_run(monkeypatch, tmp_path):
    """Where the extension cannot be built (an empty cache directory, and the build fails): one warning naming the
    cause, available() False, and auto's other CPU paths give the same results."""
    from torch.utils import cpp_extension

    native._extension.cache_clear()
    monkeypatch.setattr(native, "_build_directory", lambda source: tmp_path / "build")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: (_ for _ in ()).throw(OSError("no compiler here")))
    try:
        with pytest.warns(RuntimeWarning, match="could not be built .*no compiler here"):
            assert not native.available()
        monkeypatch.setenv("NORMLAB_BACKEND", "auto")
        x = torch.randn(6, 5)
        call = spec.call("batch", x.shape, 1e-5)
        assert backend.graph_path(x, None, None, call) is not native
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = F.batch_norm(x, None, None, training=True)
        torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    finally:
        native._extension.cache_clear()
