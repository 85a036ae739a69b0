"""The network factory: norm kinds, placement, fused layers, bias rule, dropout, and extension by a table entry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab import nn as nl
from normlab.lab import models as M


def _types(net):
    return [type(m) for m in net]


@pytest.mark.parametrize(("kind", "cls"), [("batch", nl.BatchNorm1d), ("layer", nl.LayerNorm), ("group", nl.GroupNorm)])
def test_mlp_kinds_fused_before_and_after(kind, cls):
    net = M.make_mlp((7, 12, 5), norm=kind, activation="tanh")
    assert _types(net) == [nn.Linear, cls, nn.Linear]
    norm = net[1]
    assert (norm.activation, norm.placement) == ("tanh", "before")
    assert (net[0].bias is None) == (kind == "batch")  # only a per-channel centring norm makes the bias useless
    after = M.make_mlp((7, 12, 5), norm=kind, activation="tanh", placement="after")
    assert after[1].placement == "after" and after[0].bias is not None
    x = torch.randn(6, 7)
    assert net(x).shape == (6, 5) and after(x).shape == (6, 5)


def test_unfused_blocks_keep_the_activation_module_in_order():
    before = M.make_mlp((7, 12, 12, 5), norm="batch", activation="sigmoid", fuse=False, dropout=0.2, affine=False)
    assert _types(before) == [nn.Linear, nl.BatchNorm1d, nn.Sigmoid, nn.Dropout] * 2 + [nn.Linear]
    assert before[1].affine is False and before[1].activation is None and before[3].p == 0.2
    after = M.make_mlp((7, 12, 5), norm="batch", activation="relu", placement="after", fuse=False)
    assert _types(after) == [nn.Linear, nn.ReLU, nl.BatchNorm1d, nn.Linear]
    plain = M.make_mlp((7, 12, 5), norm="none", activation="relu")
    assert _types(plain) == [nn.Linear, nn.ReLU, nn.Linear] and plain[0].bias is not None


def test_fused_equals_unfused():
    torch.manual_seed(0)
    fused = M.make_mlp((7, 12, 5), norm="batch", activation="relu", placement="after")
    unfused = M.make_mlp((7, 12, 5), norm="batch", activation="relu", placement="after", fuse=False)
    for i, j in ((0, 0), (1, 2), (2, 3)):  # Linear, BN, Linear; the unfused net has ReLU at 1
        unfused[j].load_state_dict(fused[i].state_dict())
    x = torch.randn(9, 7)
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-6)  # float32


@pytest.mark.parametrize(("kind", "cls"), [("batch", nl.BatchNorm2d), ("layer", nl.GroupNorm),
                                           ("group", nl.GroupNorm), ("instance", nl.InstanceNorm2d)])
def test_cnn_blocks(kind, cls):
    net = M.make_cnn((8, 12), norm=kind, activation="relu", dropout=0.1)
    norms = [m for m in net if isinstance(m, cls)]
    assert len(norms) == 2 and norms[0].activation == "relu"
    if kind == "layer":
        assert norms[0].num_groups == 1
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"norm": "weird"}, "norm must be one of ['none', 'batch', 'layer', 'group', 'instance'"),
    ({"placement": "middle"}, "placement must be one of ['before', 'after'], got 'middle'"),
    ({"activation": "softplus"}, "activation must be one of"),
    ({"dropout": 1.0}, "dropout must be in [0, 1), got 1.0"),
    ({"norm": "instance"}, "instance norm needs spatial dims"),
    ({"norm": "group", "groups": 5}, "groups=5 must divide the 12 channels"),
])
def test_bad_arguments_name_what_was_expected(kwargs, message):
    with pytest.raises(ValueError) as err:
        M.make_mlp((7, 12, 5), **kwargs)
    assert message in str(err.value)


def test_a_new_kind_is_one_table_entry(monkeypatch):
    monkeypatch.setattr(M, "NORM_LAYERS", dict(M.NORM_LAYERS))
    monkeypatch.setattr(M, "NORM_KINDS", M.NORM_KINDS)

    def mine(channels, dims, *, affine, eps, momentum, groups, **fused):
        return nl.BatchNorm1d(channels, eps=eps, momentum=momentum, affine=affine, **fused)

    M.register_norm("mine", mine, centers_channels=True)
    assert "mine" in M.NORM_KINDS
    net = M.make_mlp((7, 12, 5), norm="mine", activation="relu")
    assert isinstance(net[1], nl.BatchNorm1d) and net[0].bias is None


def test_batch_renorm_and_ghost_kinds():
    net = M.make_cnn((4, 8), norm="renorm", momentum=0.01)
    renorms = [m for m in net if isinstance(m, nl.BatchRenorm2d)]
    assert len(renorms) == 2 and net[0].bias is None and all(m.momentum == 0.01 for m in renorms)
    assert isinstance(M.make_mlp((7, 12, 5), norm="renorm")[1], nl.BatchRenorm1d)
    net = M.make_cnn((4, 8), norm="ghost", virtual_batch_size=3)
    ghosts = [m for m in net if isinstance(m, nl.BatchNorm2d)]
    assert [m.virtual_batch_size for m in ghosts] == [3, 3] and net[0].bias is None
    assert ghosts[0].activation == "relu"  # fused, like the other kinds
    with pytest.raises(ValueError, match="ghost batch norm needs virtual_batch_size="):
        M.make_cnn((4, 8), norm="ghost")


def test_load_weights_copies_in_order_and_checks_the_count():
    ws = M.init_weights(0, 0.01, (7, 12, 5))
    net = M.load_weights(M.make_mlp((7, 12, 5), norm="none", activation="sigmoid"), ws)
    torch.testing.assert_close(net[0].weight, torch.from_numpy(ws[0]).float())
    assert float(net[0].bias.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="2 weight matrices for 3 linear layers"):
        M.load_weights(M.make_mlp((7, 12, 12, 5)), ws)
