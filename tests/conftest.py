"""Shared test data: the shapes every norm is tested over, and the tolerance for each dtype."""

from __future__ import annotations

import pytest
import torch

from normlab.spec import ACTIVATIONS, PLACEMENTS

# (N, C, *S): primes, size-1 dims, 0-D/1-D/2-D/3-D spatial.
SHAPES = [
    (7, 3),
    (2, 5, 1),
    (3, 5, 7),
    (4, 3, 5, 7),
    (2, 1, 3, 5),
    (1, 2, 3, 1),
    (2, 3, 2, 3, 5),
    (3, 2, 1, 1, 5),
]
SPATIAL_SHAPES = [s for s in SHAPES if len(s) >= 3 and s[2:] != (1,) * (len(s) - 2)]  # more than 1 value per sample
CHANNELS_LAST_SHAPES = [s for s in SHAPES if len(s) in (4, 5)]

# (dtype, atol, rtol) for comparing normlab with torch.nn. Half precision: both sides keep float32 statistics and
# round once, so outputs agree to about one bf16 ulp; gradients go through more roundings.
TOLERANCES = [
    (torch.float64, 1e-10, 1e-8),
    (torch.float32, 1e-5, 1e-4),
    (torch.bfloat16, 3e-2, 3e-2),
    (torch.float16, 4e-3, 4e-3),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]  # against torch.nn (float16: against the reference)
TOL = {dtype: (atol, rtol) for dtype, atol, rtol in TOLERANCES}


# (activation, placement) pairs: no activation, then every fused activation before and after the norm.
ACT_PLACEMENTS = [(None, "before")] + [(a, pl) for a in ACTIVATIONS for pl in PLACEMENTS]

# torch.nn's module for each fused activation: the composition a fused layer must equal.
TORCH_ACTIVATION = {
    "relu": torch.nn.ReLU,
    "leaky_relu": torch.nn.LeakyReLU,
    "sigmoid": torch.nn.Sigmoid,
    "tanh": torch.nn.Tanh,
    "silu": torch.nn.SiLU,
    "gelu": torch.nn.GELU,
}


def assert_close(actual, expected, dtype, scale=1.0, what=""):
    """Compare with the dtype's tolerance; ``scale`` widens it for quantities summed over many values."""
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        atol=atol * scale,
        rtol=rtol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def assert_same_state(compiled, eager, dtype, grad_scale=8.0):
    """Two copies of a model after the same steps: equal buffers and parameters, and equal parameter gradients
    (within ``grad_scale`` times the dtype's tolerance: sums over the batch)."""
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert_close(b, a, dtype, what=k)
    for (k, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert_close(b.grad, a.grad, dtype, scale=grad_scale, what=f"d{k}")


def channels_last(x):
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# The CPU backends every functional test runs on: the torch path, the numba loops, the numba loops cut into
# many tasks (a task of 64 values), so that small shapes also cross task boundaries and merges, and ATen's kernels on
# shifted input (what auto runs for small inputs).
CPU_BACKENDS = ["torch", "numba", "numba-tasks", "aten", "native"]


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request, monkeypatch):
    """Select one CPU backend through NORMLAB_BACKEND (and shrink numba's tasks for "numba-tasks")."""
    name = request.param
    monkeypatch.setenv("NORMLAB_BACKEND", name.split("-")[0])
    if name == "numba-tasks":
        from normlab import numba_ops

        monkeypatch.setattr(numba_ops, "TASK_VALUES", 64)
    return name
