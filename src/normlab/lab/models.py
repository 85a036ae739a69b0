"""The paper's MNIST network (Ioffe & Szegedy 2015, §4.1): 784-100-100-100-10, sigmoid hidden units.

Both variants start from the same weights, drawn once by :func:`init_weights` with NumPy, so the torch and the
NumPy engine (and the networks with and without BN) begin at the same point:

- ``plain``: ``x -> [Linear(+bias) -> sigmoid] x 3 -> Linear(+bias)``
- ``bn``:    ``x -> [Linear(no bias) -> BatchNorm -> sigmoid] x 3 -> Linear(+bias)``; BN's β subsumes the bias.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from normlab.nn import BatchNorm1d

SIZES = (784, 100, 100, 100, 10)
VARIANTS = ("plain", "bn")  # the network without, then with batch norm


def init_weights(seed: int, init_std: float, sizes: tuple[int, ...] = SIZES) -> list[np.ndarray]:
    """Gaussian N(0, init_std²) weight matrices ``(out, in)`` for each layer, float64, from ``seed``."""
    rng = np.random.default_rng([seed, 1])  # its own stream, apart from the data order's
    return [rng.normal(0.0, init_std, size=(n_out, n_in)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]


class MLP(nn.Module):
    """The fully connected sigmoid network, with (``bn=True``) or without batch norm before each sigmoid.

    ``forward(x)`` maps ``(N, 784)`` to logits ``(N, 10)``; ``forward(x, probe=True)`` also returns the
    ``(N, 100)`` input of the last hidden layer's sigmoids, the quantity Figure 1(b, c) follows.
    """

    def __init__(self, weights: list[np.ndarray], bn: bool, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.bn = bn
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        for i, w in enumerate(weights):
            hidden = i < len(weights) - 1
            lin = nn.Linear(w.shape[1], w.shape[0], bias=not (bn and hidden))
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w))
                if lin.bias is not None:
                    lin.bias.zero_()
            self.linears.append(lin)
            if bn and hidden:
                self.norms.append(BatchNorm1d(w.shape[0], eps=eps, momentum=momentum))

    def forward(self, x: torch.Tensor, probe: bool = False):
        pre = None
        for i, lin in enumerate(self.linears[:-1]):
            pre = lin(x)
            if self.bn:
                pre = self.norms[i](pre)
            x = torch.sigmoid(pre)
        logits = self.linears[-1](x)
        return (logits, pre) if probe else logits
