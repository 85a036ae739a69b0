"""normlab.conversion: convert (both ways, with fusion), freeze_stats, FrozenBatchNorm2d, fold_bn, and autocast."""

from __future__ import annotations

import copy
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
import normlab.nn as nl
from normlab.conversion import ACTIVATION_MODULES, TWINS
from tests.conftest import assert_close


@pytest.fixture(scope="session")
def tv():
    """torchvision, importable next to a CPU-only torch as well.

    A torchvision wheel built for CUDA cannot load its compiled ops next to the CPU torch, and its import then fails
    registering fake kernels for ``torchvision::nms`` / ``qnms``, ops that were never defined. Defining those two
    schemas lets the import through; the models and ``ops.FrozenBatchNorm2d`` need no compiled op. With a matching
    torch (CI's) the first import succeeds and nothing is defined.
    """
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


# (atol, rtol) of float64 networks against each other: they differ only in summation order.
NET_TOL = (1e-9, 1e-7)


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=NET_TOL[0], rtol=NET_TOL[1], msg=lambda m: f"{what}: {m}")


def _outputs(model, x, dy=None):
    """``[y, dx, *d(parameters)]`` of one forward and backward (``dy`` random when not given), and ``dy``; the
    gradients are cleared afterwards."""
    x = x.clone().requires_grad_()
    y = model(x)
    dy = torch.randn_like(y) if dy is None else dy.to(y.dtype)
    y.backward(dy)
    out = [y.detach(), x.grad, *(p.grad for p in model.parameters())]
    model.zero_grad()
    return out, dy


def _compare_step(ours, theirs, x, what):
    """One forward and backward through both models: outputs, input gradient and every parameter gradient."""
    a, dy = _outputs(ours, x)
    b, _ = _outputs(theirs, x, dy)
    names = ["y", "dx", *(f"d{name}" for name, _ in ours.named_parameters())]
    for name, u, v in zip(names, a, b, strict=True):
        _close(u, v, f"{what} {name}")


def _compare_state(ours, theirs, what):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        if a[k].is_floating_point():
            _close(a[k], b[k], f"{what} {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what} {k}"


# ---- convert ----------------------------------------------------------------------------------------------------

def test_resnet18_converted_matches_torch(tv):
    """torchvision's ResNet-18 with normlab's norms, in float64: same outputs and gradients in train and eval, same
    buffers after each training step."""
    theirs = tv.models.resnet18(num_classes=10).double()
    ours = copy.deepcopy(theirs)
    params = list(ours.parameters())
    ours, skipped = normlab.convert(ours)
    assert skipped == []
    kinds = [type(m) for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(kinds) == 20 and set(kinds) == {nl.BatchNorm2d}
    assert all(a is b for a, b in zip(ours.parameters(), params, strict=True))
    for step in range(2):
        _compare_step(ours, theirs, torch.randn(3, 3, 29, 31, dtype=torch.float64), f"train {step}")
        _compare_state(ours, theirs, f"train {step}")
    ours.eval()
    theirs.eval()
    _compare_step(ours, theirs, torch.randn(2, 3, 32, 32, dtype=torch.float64), "eval")
    # torchvision's blocks call self.relu in forward: nothing to fuse, and fusing changes nothing
    fused, _ = normlab.convert(copy.deepcopy(ours), fuse_activations=True)
    assert all(m.activation is None for m in fused.modules() if isinstance(m, nl.BatchNorm2d))


@pytest.mark.parametrize("training", [True, False])
def test_resnet18_converted_float32_close_to_float64(tv, training):
    """In float32 the outputs and every gradient stay within 1e-3 (relative, L2) of the float64 network's. Measured
    (seed 0): dx off by 2.1e-4 in training (torch.nn's float32 network: 1.4e-4), 5.6e-7 in eval (torch.nn: 5.6e-7)."""
    theirs = tv.models.resnet18(num_classes=10).train(training)
    ours = normlab.convert(copy.deepcopy(theirs)).model
    exact = theirs.double()
    x, dy = torch.randn(3, 3, 29, 31), torch.randn(3, 10)
    names = ["y", "dx", *(f"d{name}" for name, _ in ours.named_parameters())]
    for name, a, e in zip(names, _outputs(ours, x, dy)[0], _outputs(exact, x.double(), dy)[0], strict=True):
        err = ((a.double() - e).norm() / e.norm()).item()
        assert err <= 1e-3, f"{name}: relative error {err}"


def _mixed_net(dtype=torch.float64):
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.GroupNorm(3, 6, affine=False), nn.SiLU(),
        nn.InstanceNorm2d(6, affine=True, track_running_stats=True), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(6 * 5 * 7, 5), nn.BatchNorm1d(5, momentum=None), nn.GELU(),
        nn.LayerNorm(5, bias=False), nn.Tanh(),
        nn.BatchNorm1d(5, bias=False), nn.GELU(approximate="tanh"),
    ).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def test_convert_keeps_parameters_buffers_flags_and_optimizer():
    net = _mixed_net()
    net[5].eval()  # a training flag per layer
    net[1].weight.requires_grad_(False)
    before = {k: v for k, v in net.state_dict(keep_vars=True).items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, skipped = normlab.convert(net)
    assert model is net and skipped == []
    assert [type(m) for m in net] == [nn.Conv2d, nl.BatchNorm2d, nn.ReLU, nl.GroupNorm, nn.SiLU, nl.InstanceNorm2d,
                                      nn.LeakyReLU, nn.Flatten, nn.Linear, nl.BatchNorm1d, nn.GELU, nl.LayerNorm,
                                      nn.Tanh, nl.BatchNorm1d, nn.GELU]
    after = net.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(after[k] is before[k] for k in before)  # the very tensors
    assert not net[1].weight.requires_grad and not net[5].training and net[1].training
    assert net[9].momentum is None and net[11].bias is None and net[13].bias is None and net[13].weight is not None
    assert all(t.dtype == torch.float64 for t in after.values() if t.is_floating_point())
    w = net[1].bias.detach().clone()
    net(torch.randn(4, 3, 7, 9, dtype=torch.float64)).square().sum().backward()
    opt.step()  # the optimizer built before conversion trains the converted layers
    assert not torch.equal(net[1].bias, w)


def test_convert_round_trip_and_fusion_keep_outputs():
    """to="normlab" with fusion, then back to torch: outputs and gradients equal the torch model's at each stage."""
    theirs = _mixed_net()
    ours, skipped = normlab.convert(copy.deepcopy(theirs), fuse_activations=True)
    assert skipped == []
    fused = {i: (m.activation, m.negative_slope) for i, m in enumerate(ours) if isinstance(m, nl._Fused)
             and m.activation}
    assert fused == {1: ("relu", 0.01), 3: ("silu", 0.01), 5: ("leaky_relu", 0.2), 9: ("gelu", 0.01),
                     11: ("tanh", 0.01)}  # GELU(approximate="tanh") is not fused
    assert all(type(ours[i + 1]) is nn.Identity for i in fused) and type(ours[14]) is nn.GELU
    x = torch.randn(4, 3, 7, 9, dtype=torch.float64)
    for _ in range(2):
        _compare_step(ours, theirs, x, "fused train")
    _compare_state(ours, theirs, "fused")
    back, skipped = normlab.convert(copy.deepcopy(ours), to="torch")
    assert skipped == [] and [type(m) for m in back] == [type(m) for m in theirs]
    assert back[6].negative_slope == 0.2
    ours.eval(), theirs.eval(), back.eval()
    _compare_step(ours, theirs, x, "fused eval")
    _compare_step(back, theirs, x, "back eval")


@pytest.mark.parametrize("placement", ["before", "after"])
def test_fused_layer_to_torch_becomes_sequential(placement):
    ours = nl.BatchNorm2d(4, activation="leaky_relu", placement=placement, negative_slope=0.3, dtype=torch.float64)
    theirs, skipped = normlab.convert(copy.deepcopy(ours), to="torch")
    assert skipped == [] and isinstance(theirs, nn.Sequential)
    norm = theirs[0] if placement == "before" else theirs[1]
    assert type(norm) is nn.BatchNorm2d and type(theirs[1 if placement == "before" else 0]) is nn.LeakyReLU
    _compare_step(ours, theirs, torch.randn(3, 4, 5, 2, dtype=torch.float64), placement)


def test_convert_lists_and_warns_what_it_cannot_convert():
    class MyBN(nn.BatchNorm2d):
        pass

    net = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3), MyBN(3), nn.BatchNorm2d(3, momentum=1.5),
                        nn.RMSNorm(4), nn.Conv2d(3, 3, 1))
    with pytest.warns(UserWarning, match="3 norm layer"):
        model, skipped = normlab.convert(net)
    assert [name for name, _ in skipped] == ["2", "3", "4"]
    assert "MyBN" in skipped[0][1] and "momentum" in skipped[1][1] and "RMSNorm has no normlab twin" in skipped[2][1]
    assert [type(m) for m in net] == [nl.BatchNorm2d, nl.SyncBatchNorm, MyBN, nn.BatchNorm2d, nn.RMSNorm, nn.Conv2d]
    class MyNormlabBN(nl.BatchNorm2d):
        pass

    with pytest.warns(UserWarning, match="MyNormlabBN has no torch.nn twin"):
        _, skipped = normlab.convert(nn.Sequential(MyNormlabBN(3), nl.GroupNorm(1, 3)), to="torch")
    assert [name for name, _ in skipped] == ["0"]


def test_convert_shared_layer_stays_shared():
    bn = nn.BatchNorm1d(3)
    net = nn.Sequential(bn, nn.Sequential(bn))
    normlab.convert(net)
    assert net[0] is net[1][0] and type(net[0]) is nl.BatchNorm1d


def test_convert_root_layer_and_twins_table():
    layer = nn.LayerNorm((3, 4))
    new, skipped = normlab.convert(layer)
    assert type(new) is nl.LayerNorm and new.weight is layer.weight and skipped == []
    assert all(issubclass(ours, theirs) for theirs, ours in TWINS.items())


def test_convert_bad_input():
    with pytest.raises(TypeError, match="convert expects a torch.nn.Module, got dict"):
        normlab.convert({"bn": nn.BatchNorm2d(3)})
    with pytest.raises(ValueError, match="to must be 'normlab' or 'torch', got 'onnx'"):
        normlab.convert(nn.BatchNorm2d(3), to="onnx")
    with pytest.raises(ValueError, match="fuse_activations applies to to='normlab' only"):
        normlab.convert(nn.BatchNorm2d(3), to="torch", fuse_activations=True)


# ---- freeze_stats -----------------------------------------------------------------------------------------------

def _bn_net(dtype=torch.float64):
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nl.BatchNorm2d(4, activation="relu"), nn.Flatten(),
                         nn.Linear(4 * 3 * 5, 6), nl.BatchNorm1d(6, momentum=None)).to(dtype)


def test_freeze_stats_keeps_running_statistics_and_trains_affine():
    net = _bn_net()
    for _ in range(3):  # non-trivial running statistics
        net(torch.randn(8, 3, 5, 7, dtype=torch.float64) * 2 + 1)
    assert normlab.freeze_stats(net) is net
    net.train()  # the flag survives train()
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(8, 3, 5, 7, dtype=torch.float64)
        # the eval-mode oracle: torch.nn's layers in eval mode with the same state
        oracle = normlab.convert(normlab.unfreeze_stats(copy.deepcopy(net)), to="torch").model.eval()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = net(xa), oracle(xb)
        torch.testing.assert_close(ya, yb, atol=1e-12, rtol=1e-10)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-12, rtol=1e-10)
        for (name, pa), pb in zip(net.named_parameters(), oracle.parameters(), strict=True):
            assert pa.grad.abs().sum() > 0, name
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-12, rtol=1e-10, msg=f"step {step} d{name}")
        opt.step()
        opt.zero_grad()
        for k, v in net.named_buffers():
            assert torch.equal(v, buffers[k]), f"step {step}: {k} changed"
    assert net[1].training and net[1].stats_frozen
    with pytest.warns(UserWarning, match="frozen by freeze_stats"):  # torch.nn's layers would update them
        assert [name for name, _ in normlab.convert(copy.deepcopy(net), to="torch").skipped] == ["1", "4"]
    normlab.unfreeze_stats(net)
    net(torch.randn(8, 3, 5, 7, dtype=torch.float64))
    assert int(net[1].num_batches_tracked) == int(buffers["1.num_batches_tracked"]) + 1
    assert not torch.equal(net[1].running_mean, buffers["1.running_mean"])


def test_freeze_stats_under_compile():
    net = _bn_net(torch.float32)
    net(torch.randn(8, 3, 5, 7))
    normlab.freeze_stats(net)
    mean = net[1].running_mean.clone()
    x = torch.randn(8, 3, 5, 7)
    y = torch.compile(net, fullgraph=True)(x)
    torch.testing.assert_close(y, copy.deepcopy(net).eval()(x))
    assert torch.equal(net[1].running_mean, mean)


def test_freeze_stats_bad_input():
    with pytest.raises(TypeError, match="convert these first with normlab.convert.*1 \\(BatchNorm2d\\)"):
        normlab.freeze_stats(nn.Sequential(nl.BatchNorm2d(3), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="no running statistics to freeze .*: 0"):
        normlab.freeze_stats(nn.Sequential(nl.BatchNorm2d(3, track_running_stats=False)))
    with pytest.raises(TypeError, match="freeze_stats expects a torch.nn.Module, got str"):
        normlab.freeze_stats("model")
    with pytest.raises(TypeError, match="unfreeze_stats expects a torch.nn.Module, got NoneType"):
        normlab.unfreeze_stats(None)


# ---- FrozenBatchNorm2d ------------------------------------------------------------------------------------------

def test_frozen_batchnorm_matches_torchvision(tv):
    theirs = tv.ops.FrozenBatchNorm2d(5, eps=1e-3).double()
    with torch.no_grad():
        for b in theirs.buffers():
            b.copy_(torch.rand_like(b) + 0.5)
    ours = nl.FrozenBatchNorm2d(5, eps=1e-3, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) and list(ours.parameters()) == []
    for mode in (True, False):  # the same in both modes: nothing updates
        ours.train(mode)
        _compare_step(ours, theirs, torch.randn(3, 5, 4, 7, dtype=torch.float64), f"train={mode}")
    _compare_state(ours, theirs, "frozen")
    theirs.load_state_dict(ours.state_dict())  # and back
    bn = nn.BatchNorm2d(5)  # a batch-norm checkpoint: num_batches_tracked is dropped, as torchvision does
    ours.load_state_dict(bn.state_dict())
    assert nl.FrozenBatchNorm2d(5).eps == 1e-5 and repr(ours) == "FrozenBatchNorm2d(5, eps=0.001)"


def test_torchvision_frozen_batchnorm_converts_and_folds(tv):
    theirs = nn.Sequential(nn.Conv2d(3, 4, 1), tv.ops.FrozenBatchNorm2d(4, eps=1e-3)).double()
    with torch.no_grad():
        for b in theirs[1].buffers():
            b.copy_(torch.rand_like(b) + 0.5)
    buffers = list(theirs[1].buffers())
    ours, skipped = normlab.convert(copy.deepcopy(theirs))
    assert skipped == [] and type(ours[1]) is nl.FrozenBatchNorm2d and ours[1].eps == 1e-3
    assert type(normlab.convert(theirs).model[1]) is nl.FrozenBatchNorm2d
    assert all(a is b for a, b in zip(theirs[1].buffers(), buffers, strict=True))  # the very buffers
    back = normlab.convert(copy.deepcopy(ours), to="torch").model
    assert type(back[1]) is tv.ops.FrozenBatchNorm2d
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        want = back(x)
        torch.testing.assert_close(ours(x), want)
        torch.testing.assert_close(normlab.fold_bn(back)(x), want)
    assert type(back[1]) is nn.Identity


def test_frozen_batchnorm_fused_and_bad_input():
    ours = nl.FrozenBatchNorm2d(3, activation="silu", dtype=torch.float64)
    with torch.no_grad():
        ours.running_var.fill_(2.0)
        ours.bias.fill_(0.5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    want = torch.nn.functional.silu(x / (2.0 + 1e-5) ** 0.5 + 0.5)
    torch.testing.assert_close(ours(x), want)
    with pytest.raises(ValueError, match=r"expects input \(N, 3, H, W\), got shape \(2, 4, 4, 5\)"):
        ours(torch.randn(2, 4, 4, 5))
    with pytest.raises(ValueError, match="FrozenBatchNorm2d: activation must be"):
        nl.FrozenBatchNorm2d(3, activation="swish")


# ---- fold_bn ----------------------------------------------------------------------------------------------------

FOLD_CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3), lambda: nl.BatchNorm1d(4), (5, 3, 11)),
    "conv2d-groups-nobias-relu": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False),
                                  lambda: nl.BatchNorm2d(6, activation="relu"), (3, 4, 7, 5)),
    "conv3d-torch-bn": (lambda: nn.Conv3d(2, 3, 2), lambda: nn.BatchNorm3d(3), (2, 2, 3, 4, 5)),
    "convtranspose2d-groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2),
                               lambda: nl.BatchNorm2d(6, affine=False), (3, 4, 5, 3)),
    "convtranspose1d": (lambda: nn.ConvTranspose1d(3, 5, 2), lambda: nl.BatchNorm1d(5, activation="gelu"), (4, 3, 7)),
    "linear": (lambda: nn.Linear(7, 5), lambda: nl.BatchNorm1d(5, activation="leaky_relu", negative_slope=0.1),
               (9, 7)),
    "frozen": (lambda: nn.Conv2d(3, 4, 1), lambda: nl.FrozenBatchNorm2d(4), (2, 3, 5, 5)),
}
FOLD_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (1e-5, 1e-4)}


@pytest.mark.parametrize("case", list(FOLD_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fold_bn_keeps_outputs(case, dtype):
    make_layer, make_bn, shape = FOLD_CASES[case]
    net = nn.Sequential(make_layer(), make_bn()).to(dtype)
    with torch.no_grad():
        for t in [*net.parameters(), *net[1].buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    for _ in range(2):  # running statistics from training
        net(torch.randn(shape, dtype=dtype) * 3)
    net.eval()
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        want = net(x)
    act = getattr(net[1], "activation", None)
    assert normlab.fold_bn(net) is net
    assert type(net[1]) is (nn.Identity if act is None else type(ACTIVATION_MODULES[act](0.01)))
    with torch.no_grad():
        atol, rtol = FOLD_TOL[dtype]
        torch.testing.assert_close(net(x), want, atol=atol, rtol=rtol)
    assert net[0].weight.dtype == dtype and net[0].bias.dtype == dtype


def test_fold_bn_refuses_training_mode_and_missing_statistics():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nl.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    weight = net[0].weight.detach().clone()
    with pytest.raises(ValueError, match="batch norm '1' is in training mode.*model.eval"):
        normlab.fold_bn(net)
    assert torch.equal(net[0].weight, weight) and type(net[1]) is nl.BatchNorm2d  # nothing changed
    net.eval()
    net[2][1].train()
    with pytest.raises(ValueError, match="'2.1' is in training mode"):
        normlab.fold_bn(net)
    untracked = nn.Sequential(nn.Linear(3, 4), nl.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="has no running statistics"):
        normlab.fold_bn(untracked)
    with pytest.raises(TypeError, match="fold_bn expects a torch.nn.Module, got list"):
        normlab.fold_bn([net])
    frozen = nn.Sequential(nn.Linear(3, 4), nl.BatchNorm1d(4))
    normlab.freeze_stats(frozen)  # frozen statistics normalize in training mode too: it folds
    x = torch.randn(5, 3)
    with torch.no_grad():
        want = frozen(x)
        torch.testing.assert_close(normlab.fold_bn(frozen)(x), want)
    assert type(frozen[1]) is nn.Identity


# ---- autocast ---------------------------------------------------------------------------------------------------

AUTOCAST_LAYERS = {
    "BatchNorm2d": lambda mod: mod.BatchNorm2d(6),
    "GroupNorm": lambda mod: mod.GroupNorm(3, 6),
    "InstanceNorm2d": lambda mod: mod.InstanceNorm2d(6, affine=True, track_running_stats=True),
    "LayerNorm": lambda mod: mod.LayerNorm((6, 9, 9)),
}


@pytest.mark.parametrize("name", list(AUTOCAST_LAYERS))
def test_autocast_cpu_bfloat16_matches_torch(name):
    """Under CPU autocast (bfloat16 convolutions) normlab's layers give torch.nn's output dtypes and values, and
    keep float32 statistics and running buffers."""
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 6, 3)
    theirs = nn.Sequential(conv, AUTOCAST_LAYERS[name](nn))
    ours = nn.Sequential(copy.deepcopy(conv), AUTOCAST_LAYERS[name](nl))
    ours.load_state_dict(theirs.state_dict())
    for training in (True, True, False):
        ours.train(training), theirs.train(training)
        x = torch.randn(8, 3, 11, 11) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ya, yb = ours(xa), theirs(xb)
        assert ya.dtype == yb.dtype == torch.bfloat16
        assert_close(ya, yb, torch.bfloat16, what="y")
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert_close(xa.grad, xb.grad, torch.bfloat16, scale=2, what="dx")
        for (k, pa), pb in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert pa.dtype == torch.float32
            assert_close(pa.grad, pb.grad, torch.bfloat16, scale=4 * (1 + x.numel() ** 0.5 / 4), what=f"d{k}")
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert a.dtype == b.dtype, k
        if a.is_floating_point():
            assert a.dtype == torch.float32
            assert_close(a, b, torch.bfloat16, what=k)
        else:
            assert torch.equal(a, b), k


def test_no_warnings_from_clean_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.convert(_mixed_net(), fuse_activations=True)


def test_readme_examples_run(tmp_path, monkeypatch):
    """The README's "Working with existing models" examples run as written, in order."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Working with existing models") :]
    section = section[: section.index("\n## ", 1)]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))
    monkeypatch.chdir(tmp_path)  # the ONNX file lands here
    with pytest.warns(UserWarning, match="RMSNorm has no normlab twin"):
        exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "model.onnx").stat().st_size > 0



def test_freeze_stats_holds_for_batch_renorm_and_ghost_batch_norm():
    """Frozen batch renorm and ghost batch norm layers normalize with their running statistics in training mode
    and keep them, as eval mode does."""
    torch.manual_seed(0)
    net = nn.Sequential(nl.BatchRenorm2d(3, rmax=1.5, dmax=0.5), nl.BatchNorm2d(3, virtual_batch_size=2)).double()
    net(torch.randn(6, 3, 4, 5, dtype=torch.float64) * 2 + 1)  # running statistics of their own
    before = copy.deepcopy(net.state_dict())
    normlab.freeze_stats(net).train()
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    y = net(x)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert_close(y, copy.deepcopy(net).eval()(x), torch.float64)


def test_convert_sync_batchnorm_leaves_batch_renorm_and_ghost_batch_norm_alone():
    """SyncBatchNorm would silently turn them into plain batch norm: they stay, with a warning."""
    net = nn.Sequential(nl.BatchRenorm2d(3), nl.BatchNorm2d(3, virtual_batch_size=2), nl.BatchNorm2d(3),
                        nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match="no synchronized form"):
        out = nl.SyncBatchNorm.convert_sync_batchnorm(net)
    assert [type(m) for m in out] == [nl.BatchRenorm2d, nl.BatchNorm2d, nl.SyncBatchNorm, nl.SyncBatchNorm]
