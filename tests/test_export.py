"""Models of normlab layers under torch.compile(fullgraph=True) (train and eval), torch.export and ONNX (eval)."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import normlab.nn as nl


class AllNorms(nn.Module):
    """Every normlab layer kind, fused activations before and after, on inputs of 2 to 5 dims."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn2 = nl.BatchNorm2d(6, activation="relu")
        self.gn = nl.GroupNorm(3, 6, activation="gelu")
        self.in2 = nl.InstanceNorm2d(6, affine=True, track_running_stats=True, activation="leaky_relu",
                                     negative_slope=0.2)
        self.bn3 = nl.BatchNorm3d(6, activation="silu", placement="after")
        self.in3 = nl.InstanceNorm3d(6)
        self.in1 = nl.InstanceNorm1d(6, affine=True)
        self.bn1 = nl.BatchNorm1d(6, momentum=None, activation="tanh")
        self.fc = nn.Linear(6 * 42, 5)
        self.bn0 = nl.BatchNorm1d(5, activation="sigmoid")
        self.ln = nl.LayerNorm((5,), bias=False)
        self.ln2 = nl.LayerNorm((6, 7), activation="relu")

    def forward(self, x):  # (N, 3, 8, 9)
        x = self.in2(self.gn(self.bn2(self.conv(x))))  # (N, 6, 6, 7)
        n = x.shape[0]
        x = self.in3(self.bn3(x.reshape(n, 6, 2, 3, 7)))
        x = self.bn1(self.in1(x.reshape(n, 6, 42)))
        y = self.ln(self.bn0(self.fc(x.reshape(n, -1))))  # (N, 5)
        return y.sum(1, keepdim=True) + self.ln2(x.reshape(n, 6, 6, 7)).mean((1, 2))  # (N, 7)


def _plain_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nl.BatchNorm2d(4, activation="relu"), nl.GroupNorm(2, 4),
                         nl.LayerNorm((4, 6, 7)))


def _family_cnn():
    """SyncBatchNorm (one process: plain batch norm), batch renorm and ghost batch norm (10 = 4 + 4 + 2 samples)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nl.SyncBatchNorm(4, activation="relu"),
                         nl.BatchRenorm2d(4, activation="silu", rmax=1.5, dmax=0.5),
                         nl.BatchNorm2d(4, virtual_batch_size=4, activation="tanh"))


# name -> (model builder, input shape).
MODELS = {"all_norms": (AllNorms, (4, 3, 8, 9)), "cnn": (_plain_cnn, (2, 3, 8, 9)),
          "family": (_family_cnn, (10, 3, 8, 9))}


def _model(name):
    torch.manual_seed(1)
    make, shape = MODELS[name]
    model = make()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # non-trivial affine parameters
    return model, shape


def _trained(name):
    """The model in eval mode after two training steps (running statistics of its own)."""
    model, shape = _model(name)
    for _ in range(2):
        model(torch.randn(shape) * 2 + 1)
    return model.eval(), shape


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_matches_eager(name, monkeypatch):
    """The norms are single custom ops to the compiler: no graph break, the same outputs, gradients and running
    buffers as eager, in training and then in eval mode. The custom ops run the numba loops on the CPU; eager runs
    them too here (auto would take ATen's kernels for these small inputs, equal to float32 rounding, not bits)."""
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    eager, shape = _model(name)
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, fullgraph=True)
    for training in (True, True, False):
        eager.train(training)
        compiled.train(training)
        x = torch.randn(shape) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(xa), run(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        what = "train" if training else "eval"
        pairs = [("y", yb, ya), ("dx", xb.grad, xa.grad)]
        pairs += [(f"d{k}", pb.grad, pa.grad) for (k, pa), pb in zip(eager.named_parameters(), compiled.parameters(),
                                                                         strict=True)]
        pairs += [(k, b, a) for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(),
                                                 strict=True)]
        for k, b, a in pairs:
            torch.testing.assert_close(b, a, msg=lambda m, k=k, what=what: f"{what} {k}: {m}")


def _inputs(shape):
    """Inputs of the exported batch size and of another one (the batch dimension is exported as dynamic)."""
    return [torch.randn(shape) * 2 + 1, torch.randn(7, *shape[1:]) * 2 + 1]


DYNAMIC_BATCH = ({0: torch.export.Dim("batch", min=2, max=64)},)


@pytest.mark.parametrize("name", list(MODELS))
def test_torch_export_matches_eager(name):
    """In eval mode the exported program is plain aten ops (no normlab op left) and gives eager's outputs, at any
    batch size."""
    model, shape = _trained(name)
    program = torch.export.export(model, (torch.randn(shape),), dynamic_shapes=DYNAMIC_BATCH)
    assert "normlab" not in str(program.graph)
    for x in _inputs(shape):
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_onnx_matches_eager(name, tmp_path):
    """Exported to ONNX (torch.onnx.export, dynamo=True) and run by onnxruntime: eager's outputs, at any batch
    size."""
    model, shape = _trained(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(shape),), dynamic_shapes=DYNAMIC_BATCH, dynamo=True).save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in _inputs(shape):
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, model(x).numpy(), atol=1e-5, rtol=1e-4)
