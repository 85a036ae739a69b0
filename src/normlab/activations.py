"""The activations a norm can fuse, as torch functions of the pre-activation value and their derivatives.

The NumPy twins live in :mod:`normlab.reference` (float64); the Triton twins in :mod:`normlab.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from normlab.spec import LEAKY_SLOPE


class Activation(NamedTuple):
    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor], torch.Tensor]  # f'(v) at the pre-activation value v


def _silu_grad(v):
    s = torch.sigmoid(v)
    return s * (1 + v * (1 - s))


def _gelu_grad(v):
    cdf = 0.5 * (1 + torch.erf(v * (1 / math.sqrt(2))))
    return cdf + v * torch.exp(-0.5 * v * v) * (1 / math.sqrt(2 * math.pi))


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(torch.relu, lambda v: (v > 0).to(v.dtype)),
    "leaky_relu": Activation(
        lambda v: torch.nn.functional.leaky_relu(v, LEAKY_SLOPE),
        lambda v: (v > 0).to(v.dtype) * (1 - LEAKY_SLOPE) + LEAKY_SLOPE,
    ),
    "sigmoid": Activation(torch.sigmoid, lambda v: torch.sigmoid(v) * (1 - torch.sigmoid(v))),
    "tanh": Activation(torch.tanh, lambda v: 1 - torch.tanh(v) ** 2),
    "silu": Activation(torch.nn.functional.silu, _silu_grad),
    "gelu": Activation(torch.nn.functional.gelu, _gelu_grad),
}
