"""The lab's networks, built from one factory: an MLP and a small CNN, parameterized by their normalization.

In the style of timm's ``get_norm_layer``: :func:`get_norm_layer` maps a norm kind to a layer through the table
:data:`NORM_LAYERS` (a new kind is one :func:`register_norm` call), and :func:`make_mlp` / :func:`make_cnn` stack
blocks ``linear/conv -> norm -> activation -> dropout`` (``placement="before"``, the paper's) or
``linear/conv -> activation -> norm -> dropout`` (``"after"``). Where the norm sits directly before or after the
activation, the block uses normlab's fused layer (``BatchNorm1d(100, activation="relu")``) unless ``fuse=False``,
which keeps a separate activation module (so its input can be watched, as Figure 1 does).

A block's linear/conv layer has no bias when a norm placed before the activation subtracts a per-channel mean
(batch and instance norm: their shift takes the bias's place, the paper's §3.2); otherwise it has one.

The paper's MNIST network (§4.1) is ``make_mlp(SIZES, norm="batch" or "none", activation="sigmoid", fuse=False)``
with the shared Gaussian weights of :func:`init_weights` copied in by :func:`load_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from normlab import nn as nl
from normlab.spec import ACTIVATIONS, PLACEMENTS

SIZES = (784, 100, 100, 100, 10)  # the paper's MNIST MLP


class NormKind(NamedTuple):
    """How to build one kind of norm: ``build(channels, dims, **options)``; whether it removes a per-channel mean."""

    build: Callable[..., nn.Module]
    centers_channels: bool


def _batch(channels, dims, *, affine, eps, momentum, groups, **fused):
    cls = nl.BatchNorm1d if dims == 1 else nl.BatchNorm2d
    return cls(channels, eps=eps, momentum=momentum, affine=affine, **fused)


def _renorm(channels, dims, *, affine, eps, momentum, groups, **fused):
    cls = nl.BatchRenorm1d if dims == 1 else nl.BatchRenorm2d
    return cls(channels, eps=eps, momentum=momentum, affine=affine, **fused)


def _ghost(channels, dims, *, affine, eps, momentum, groups, virtual_batch_size=None, **fused):
    if virtual_batch_size is None:
        raise ValueError("ghost batch norm needs virtual_batch_size= (the size of the batches its statistics are "
                         "taken over)")
    return _batch(channels, dims, affine=affine, eps=eps, momentum=momentum, groups=groups,
                  virtual_batch_size=virtual_batch_size, **fused)


def _layer(channels, dims, *, affine, eps, momentum, groups, **fused):
    # On (N, C, H, W) layer norm normalizes each sample over (C, H, W): GroupNorm with one group, which keeps the
    # per-channel affine of conv nets (LayerNorm((C, H, W)) would fix the image size).
    if dims == 1:
        return nl.LayerNorm(channels, eps=eps, elementwise_affine=affine, bias=affine, **fused)
    return nl.GroupNorm(1, channels, eps=eps, affine=affine, **fused)


def _group(channels, dims, *, affine, eps, momentum, groups, **fused):
    if channels % groups:
        raise ValueError(f"group norm: groups={groups} must divide the {channels} channels")
    return nl.GroupNorm(groups, channels, eps=eps, affine=affine, **fused)


def _instance(channels, dims, *, affine, eps, momentum, groups, **fused):
    if dims == 1:
        raise ValueError("instance norm needs spatial dims (a CNN): on (N, C) features each value is its own instance")
    return nl.InstanceNorm2d(channels, eps=eps, momentum=momentum, affine=affine, **fused)


# kind -> builder; other kinds are one register_norm call away. "renorm": batch renorm (its limits are set by
# normlab.nn.set_renorm_limits); "ghost": batch norm over virtual batches (needs virtual_batch_size=).
NORM_LAYERS: dict[str, NormKind] = {
    "batch": NormKind(_batch, True),
    "layer": NormKind(_layer, False),
    "group": NormKind(_group, False),
    "instance": NormKind(_instance, True),
    "renorm": NormKind(_renorm, True),
    "ghost": NormKind(_ghost, True),
}
NORM_KINDS = ("none", *NORM_LAYERS)

ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def register_norm(kind: str, build: Callable[..., nn.Module], centers_channels: bool) -> None:
    """Add (or replace) norm ``kind``: ``build(channels, dims, *, affine, eps, momentum, groups, activation=None,
    placement="before")`` returns the layer for ``(N, channels)`` (dims 1) or ``(N, channels, H, W)`` (dims 2)
    inputs; ``centers_channels``: it removes a per-channel mean, so a bias before it is useless."""
    NORM_LAYERS[kind] = NormKind(build, centers_channels)
    global NORM_KINDS
    NORM_KINDS = ("none", *NORM_LAYERS)


def get_norm_layer(kind: str, channels: int, dims: int = 1, *, affine: bool = True, eps: float = 1e-5,
                   momentum: float | None = 0.1, groups: int = 4, activation: str | None = None,
                   placement: str = "before", **options) -> nn.Module | None:
    """The ``kind`` norm layer for ``channels`` features (``dims=1``: ``(N, C)``; ``2``: ``(N, C, H, W)``), or None
    for ``"none"``; ``activation``/``placement`` make it a fused normlab layer; ``options`` go to the kind's
    builder (ghost's ``virtual_batch_size``)."""
    if kind == "none":
        return None
    if kind not in NORM_LAYERS:
        raise ValueError(f"norm must be one of {list(NORM_KINDS)}, got {kind!r}")
    fused = {} if activation is None else {"activation": activation, "placement": placement}
    return NORM_LAYERS[kind].build(channels, dims, affine=affine, eps=eps, momentum=momentum, groups=groups, **fused,
                                   **options)


def _check(norm: str, placement: str, activation: str, dropout: float) -> None:
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {list(NORM_KINDS)}, got {norm!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")


def block(layer: Callable[[bool], nn.Module], channels: int, dims: int, *, norm: str, placement: str,
          activation: str, dropout: float, affine: bool, fuse: bool, **norm_options) -> list[nn.Module]:
    """One ``layer -> norm -> activation -> dropout`` block (or ``-> activation -> norm`` for ``"after"``) as a
    list of modules; ``layer(bias)`` builds the linear/conv layer that outputs ``channels``."""
    _check(norm, placement, activation, dropout)
    bias = not (norm != "none" and placement == "before" and NORM_LAYERS[norm].centers_channels)
    mods = [layer(bias)]
    if norm == "none":
        mods.append(ACTIVATION_MODULES[activation]())
    elif fuse:
        mods.append(get_norm_layer(norm, channels, dims, affine=affine, activation=activation, placement=placement,
                                   **norm_options))
    else:
        act, nrm = ACTIVATION_MODULES[activation](), get_norm_layer(norm, channels, dims, affine=affine,
                                                                      **norm_options)
        mods += [nrm, act] if placement == "before" else [act, nrm]
    if dropout:
        mods.append(nn.Dropout(dropout))
    return mods


def make_mlp(sizes: Sequence[int] = SIZES, *, norm: str = "batch", placement: str = "before",
             activation: str = "relu", dropout: float = 0.0, affine: bool = True, fuse: bool = True,
             **norm_options) -> nn.Sequential:
    """A fully connected network ``sizes[0] -> ... -> sizes[-1]``: one block per hidden layer, then a linear
    output layer (with bias). Input ``(N, sizes[0])``, logits ``(N, sizes[-1])``. ``norm_options`` (eps, momentum,
    groups) go to :func:`get_norm_layer`."""
    mods: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        mods += block(lambda bias, i=n_in, o=n_out: nn.Linear(i, o, bias=bias), n_out, 1, norm=norm,
                      placement=placement, activation=activation, dropout=dropout, affine=affine, fuse=fuse,
                      **norm_options)
    mods.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*mods)


def make_cnn(channels: Sequence[int] = (16, 32), classes: int = 10, in_channels: int = 1, image_size: int = 28, *,
             norm: str = "batch", placement: str = "before", activation: str = "relu", dropout: float = 0.0,
             affine: bool = True, fuse: bool = True, **norm_options) -> nn.Sequential:
    """A small CNN: per entry of ``channels`` a 3x3 conv block (padding 1) and a 2x2 max-pool, then a linear
    classifier on the flattened maps. Input ``(N, in_channels, image_size, image_size)``, logits ``(N, classes)``;
    ``dropout`` applies after each block."""
    mods: list[nn.Module] = []
    c_in, size = in_channels, image_size
    for c_out in channels:
        mods += block(lambda bias, i=c_in, o=c_out: nn.Conv2d(i, o, 3, padding=1, bias=bias), c_out, 2, norm=norm,
                      placement=placement, activation=activation, dropout=dropout, affine=affine, fuse=fuse,
                      **norm_options)
        mods.append(nn.MaxPool2d(2))
        c_in, size = c_out, size // 2
    mods += [nn.Flatten(), nn.Linear(c_in * size * size, classes)]
    return nn.Sequential(*mods)


def init_weights(seed: int, init_std: float, sizes: Sequence[int] = SIZES) -> list[np.ndarray]:
    """Gaussian N(0, init_std²) weight matrices ``(out, in)`` for each layer, float64, from ``seed``."""
    rng = np.random.default_rng([seed, 1])  # its own stream, apart from the data order's
    return [rng.normal(0.0, init_std, size=(n_out, n_in)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]


@torch.no_grad()
def load_weights(model: nn.Module, weights: Sequence[np.ndarray]) -> nn.Module:
    """Copy ``weights`` into ``model``'s linear layers in order and zero their biases; returns ``model``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) != len(weights):
        raise ValueError(f"load_weights: {len(weights)} weight matrices for {len(linears)} linear layers")
    for lin, w in zip(linears, weights):
        lin.weight.copy_(torch.from_numpy(w))
        if lin.bias is not None:
            lin.bias.zero_()
    return model
