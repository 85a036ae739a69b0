"""The activations a norm can fuse, as torch functions of the pre-activation value and their derivatives.

The NumPy twins live in :mod:`normlab.reference` (float64), the compiled CPU ones in :mod:`normlab.numba_ops`, the
Triton ones in :mod:`normlab.kernels`. ``leaky_relu`` takes the call's ``negative_slope``; ``gelu`` is the exact
(erf) form, as ``torch.nn.GELU()``.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def _leaky_relu(slope: float) -> Activation:
    return Activation(
        lambda v: torch.nn.functional.leaky_relu(v, slope),
        lambda v: torch.full_like(v, slope).masked_fill_(v > 0, 1.0),  # slope in v.dtype, not float32
    )


_FIXED: dict[str, Activation] = {
    "relu": Activation(torch.relu, lambda v: (v > 0).to(v.dtype)),
    "sigmoid": Activation(torch.sigmoid, lambda v: torch.sigmoid(v) * (1 - torch.sigmoid(v))),
    "tanh": Activation(torch.tanh, lambda v: 1 - torch.tanh(v) ** 2),
    "silu": Activation(torch.nn.functional.silu, _silu_grad),
    "gelu": Activation(torch.nn.functional.gelu, _gelu_grad),
}


def get(name: str | None, negative_slope: float = LEAKY_SLOPE) -> Activation | None:
    """The activation ``name`` (a name in :data:`normlab.spec.ACTIVATIONS`) as torch functions, or None."""
    if name == "leaky_relu":
        return _leaky_relu(negative_slope)
    return None if name is None else _FIXED[name]
