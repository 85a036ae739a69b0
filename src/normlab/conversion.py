"""Existing models and normlab: convert their norms both ways, fuse activations, freeze or fold batch statistics.

- :func:`convert` swaps every torch.nn norm layer for its normlab twin (or back), keeping the very Parameter and
  buffer tensors, so an optimizer built before the conversion keeps working; with ``fuse_activations=True`` a norm
  followed by an activation module in an ``nn.Sequential`` becomes one fused layer.
- :func:`freeze_stats` / :func:`unfreeze_stats`: batch norms normalize with, and keep, their running statistics in
  training mode too, while the affine parameters train.
- :func:`fold_bn`: eval-mode batch norms folded into the convolution or linear layer before them, for inference.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from normlab import nn as nl

# ---- the twins --------------------------------------------------------------------------------------------------

# torch.nn class -> normlab class. Exact types: a subclass of a torch norm may change its forward, so it is listed as
# not converted rather than guessed at. SyncBatchNorm keeps its process group (see _config).
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: nl.BatchNorm1d,
    nn.BatchNorm2d: nl.BatchNorm2d,
    nn.BatchNorm3d: nl.BatchNorm3d,
    nn.InstanceNorm1d: nl.InstanceNorm1d,
    nn.InstanceNorm2d: nl.InstanceNorm2d,
    nn.InstanceNorm3d: nl.InstanceNorm3d,
    nn.GroupNorm: nl.GroupNorm,
    nn.LayerNorm: nl.LayerNorm,
    nn.SyncBatchNorm: nl.SyncBatchNorm,
}

# torch's norm layers that convert should meet (a layer of these kinds it cannot convert is listed and warned about).
_TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)

# The activation modules a fused activation corresponds to (torch.nn's defaults: GELU is the exact erf form).
ACTIVATION_MODULES: dict[str, Callable[[float], nn.Module]] = {
    "relu": lambda slope: nn.ReLU(),
    "leaky_relu": lambda slope: nn.LeakyReLU(slope),
    "sigmoid": lambda slope: nn.Sigmoid(),
    "tanh": lambda slope: nn.Tanh(),
    "silu": lambda slope: nn.SiLU(),
    "gelu": lambda slope: nn.GELU(),
}
_ACTIVATION_NAMES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                     nn.SiLU: "silu", nn.GELU: "gelu"}


def _activation_of(m: nn.Module) -> tuple[str, float] | None:
    """``(name, negative_slope)`` of the fusable activation module ``m`` (exact torch.nn types; GELU only in its erf
    form), or None."""
    name = _ACTIVATION_NAMES.get(type(m))
    if name is None or (name == "gelu" and m.approximate != "none"):
        return None
    return name, (m.negative_slope if name == "leaky_relu" else nl.LEAKY_SLOPE)


def _torchvision_frozen() -> tuple[type[nn.Module], ...]:
    """``(torchvision.ops.FrozenBatchNorm2d,)`` when torchvision is loaded, else ``()``: a model holding that layer has
    imported it, and normlab never imports torchvision itself."""
    cls = getattr(sys.modules.get("torchvision.ops.misc"), "FrozenBatchNorm2d", None)
    return () if cls is None else (cls,)


def _table(to: str) -> dict[type[nn.Module], type[nn.Module]]:
    """:data:`TWINS` (``to="normlab"``) or its inverse, with torchvision's FrozenBatchNorm2d and normlab's."""
    table = dict(TWINS) | {cls: nl.FrozenBatchNorm2d for cls in _torchvision_frozen()}
    return table if to == "normlab" else {v: k for k, v in table.items()}


def _config(m: nn.Module) -> dict:
    """The constructor arguments that rebuild norm layer ``m`` (torch's, torchvision's or normlab's) as its twin."""
    bias = {} if getattr(m, "bias", None) is not None or not getattr(m, "affine", True) else {"bias": False}
    if isinstance(m, nn.GroupNorm):
        return {"num_groups": m.num_groups, "num_channels": m.num_channels, "eps": m.eps, "affine": m.affine, **bias}
    if isinstance(m, nn.LayerNorm):
        return {"normalized_shape": m.normalized_shape, "eps": m.eps, "elementwise_affine": m.elementwise_affine,
                "bias": m.bias is not None or not m.elementwise_affine}
    if not isinstance(m, nn.modules.batchnorm._NormBase):  # FrozenBatchNorm2d: four buffers and eps
        return {"num_features": m.running_mean.numel(), "eps": m.eps}
    kw = {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine,
          "track_running_stats": m.track_running_stats, **bias}
    if isinstance(m, nn.SyncBatchNorm):
        kw["process_group"] = m.process_group
    return kw


def _device(m: nn.Module) -> torch.device | None:
    t = next(iter(m.parameters(recurse=False)), None)
    t = t if t is not None else next(iter(m.buffers(recurse=False)), None)
    return None if t is None else t.device


def _twin(m: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """``cls`` built with ``m``'s configuration, holding ``m``'s own Parameter and buffer tensors and training flag."""
    where = {"device": _device(m)} if "device" in inspect.signature(cls).parameters else {}  # not torchvision's
    new = cls(**_config(m), **where)
    for name in new._parameters:
        new._parameters[name] = m._parameters[name]
    for name in new._buffers:  # a buffer only the new class has (num_skipped_updates) keeps its initial value
        if name in m._buffers:
            new._buffers[name] = m._buffers[name]
    new.training = m.training
    return new


# ---- convert ----------------------------------------------------------------------------------------------------

class Converted(NamedTuple):
    """What :func:`convert` returns: the converted model, and the norm layers it left as they were.

    Attributes:
        model: the model (the same object, changed in place, unless the model itself was a norm layer).
        skipped: ``(qualified name, reason)`` for each norm layer that was not converted.
    """

    model: nn.Module
    skipped: list[tuple[str, str]]


def convert(model: nn.Module, to: str = "normlab", *, fuse_activations: bool = False) -> Converted:
    """Replace the norm layers of ``model`` with their normlab twins (``to="normlab"``) or torch.nn's (``"torch"``).

    Each new layer holds the old layer's own Parameter and buffer tensors (so ``requires_grad``, device, dtype and
    an optimizer built before the conversion carry over; the old layer should not be used any more), and its
    training flag; hooks registered on the old layer are not carried over. Conversion happens in place, in every
    container; a layer shared by several parents becomes one shared twin.

    ``to="normlab"`` converts torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, GroupNorm and LayerNorm (exact
    types; see :data:`TWINS`), and torchvision's FrozenBatchNorm2d when torchvision is loaded. With
    ``fuse_activations=True``, a normlab layer directly followed, in an ``nn.Sequential``, by ``nn.ReLU``,
    ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.GELU()`` (erf form), ``nn.Sigmoid`` or ``nn.Tanh`` takes that activation
    fused, and the activation is replaced by ``nn.Identity`` (state_dict keys stay). An activation called in a
    ``forward`` method (torchvision's ResNet blocks) is not seen and not fused.

    ``to="torch"`` converts normlab's layers back (FrozenBatchNorm2d to torchvision's). A fused layer becomes the
    torch norm and the activation module: in the Identity its fusion left behind when there is one, else as
    ``nn.Sequential(norm, activation)`` (or ``(activation, norm)`` for ``placement="after"``), whose state_dict keys
    gain ``.0``/``.1``.

    Norm layers that cannot be converted (RMSNorm, subclasses, settings normlab refuses such
    as a momentum outside [0, 1]) are left as they are, listed in the result's ``skipped``, and named in one
    warning.

    Args:
        model: a ``torch.nn.Module`` (a model, or a single norm layer).
        to: ``"normlab"`` or ``"torch"``.
        fuse_activations: fold activation modules into the norm before them (``to="normlab"`` only).

    Returns:
        :class:`Converted` ``(model, skipped)``; ``model`` is the converted model (a new object only when ``model``
        was itself a converted norm layer).

    Raises:
        TypeError: ``model`` is not a torch.nn.Module.
        ValueError: ``to`` is neither ``"normlab"`` nor ``"torch"``; ``fuse_activations`` with ``to="torch"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if to not in ("normlab", "torch"):
        raise ValueError(f"convert: to must be 'normlab' or 'torch', got {to!r}")
    if fuse_activations and to != "normlab":
        raise ValueError("convert: fuse_activations applies to to='normlab' only")
    table = _table(to)
    skipped: list[tuple[str, str]] = []
    done: dict[nn.Module, nn.Module] = {}  # old layer -> its replacement, so a shared layer is converted once
    seen: set[nn.Module] = set()

    def visit(name: str, m: nn.Module) -> nn.Module:
        if type(m) in table and m not in done:
            done[m] = _converted(name, m, table, to, skipped)
        elif m not in seen and m not in done:
            _note_skip(name, m, to, skipped)
        seen.add(m)
        return done.get(m, m)

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = visit(f"{parent_name}.{child_name}" if parent_name else child_name, child)
            if new is not child:
                setattr(parent, child_name, new)
    model = visit("(model)", model)
    if to == "torch":
        _unfuse_sequentials(model)
    elif fuse_activations:
        _fuse_sequentials(model)
    if skipped:
        listed = "; ".join(f"{name} ({why})" for name, why in skipped)
        warnings.warn(f"convert: {len(skipped)} norm layer(s) left as they were: {listed}", UserWarning, stacklevel=2)
    return Converted(model, skipped)


def _note_skip(name: str, m: nn.Module, to: str, skipped: list) -> None:
    """List ``m`` if it is a norm layer of the side being converted from that has no twin."""
    if to == "normlab" and isinstance(m, _TORCH_NORMS) and not isinstance(m, nl._Fused):
        skipped.append((name, f"{type(m).__module__}.{type(m).__qualname__} has no normlab twin"))
    elif to == "torch" and isinstance(m, nl._Fused):
        skipped.append((name, f"{type(m).__qualname__} has no torch.nn twin"))


def _converted(name: str, m: nn.Module, table: dict, to: str, skipped: list) -> nn.Module:
    """The twin of ``m``; ``m`` itself, listed in ``skipped``, if the twin refuses m's settings."""
    if to == "torch" and getattr(m, "virtual_batch_size", None) is not None:
        skipped.append((name, "ghost batch norm (virtual_batch_size) has no torch.nn twin"))
        return m
    if to == "torch" and getattr(m, "stats_frozen", False):
        skipped.append((name, "statistics frozen by freeze_stats, which torch.nn's layer would update in training "
                              "mode; call unfreeze_stats first"))
        return m
    try:
        new = _twin(m, table[type(m)])
    except (TypeError, ValueError) as e:
        skipped.append((name, str(e)))
        return m
    if to == "torch" and m.activation is not None:
        act = ACTIVATION_MODULES[m.activation](m.negative_slope)
        act.training = m.training
        new = nn.Sequential(act, new) if m.placement == "after" else nn.Sequential(new, act)
        new._normlab_unfused = True  # _unfuse_sequentials may put the activation back in its Identity
    return new


def _fuse_sequentials(model: nn.Module) -> None:
    """Give each normlab layer directly followed by a fusable activation in a Sequential that activation, and put an
    Identity in the activation's place."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            norm, act = seq._modules[first], seq._modules[second]
            found = _activation_of(act)
            if isinstance(norm, nl._Fused) and norm.activation is None and found is not None:
                norm._setup(found[0], "before", found[1])
                seq._modules[second] = nn.Identity()


def _unfuse_sequentials(model: nn.Module) -> None:
    """Inverse of :func:`_fuse_sequentials`: ``Sequential(norm, act)`` built by :func:`_converted` for a fused layer
    followed by an Identity in a Sequential goes back to ``norm`` in its place and ``act`` in the Identity's."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            pair, slot = seq._modules[first], seq._modules[second]
            if (getattr(pair, "_normlab_unfused", False) and type(slot) is nn.Identity
                    and _activation_of(pair[1]) is not None):  # (norm, act): placement "before"
                seq._modules[first], seq._modules[second] = pair[0], pair[1]
    for m in model.modules():
        m.__dict__.pop("_normlab_unfused", None)


# ---- frozen statistics ------------------------------------------------------------------------------------------

def _batch_norms(model: nn.Module, who: str) -> list[tuple[str, nn.Module]]:
    """The batch-norm layers of ``model`` (``(name, layer)``); raises if any of them cannot freeze its statistics."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} expects a torch.nn.Module, got {type(model).__name__}")
    layers = [(name or "(model)", m) for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    foreign = [f"{name} ({type(m).__qualname__})" for name, m in layers if not hasattr(m, "stats_frozen")]
    if foreign:
        raise TypeError(f"{who}: normlab's batch-norm layers honour frozen statistics, torch.nn's do not; convert "
                        f"these first with normlab.convert(model): {', '.join(foreign)}")
    return layers


def freeze_stats(model: nn.Module) -> nn.Module:
    """Make every batch-norm layer of ``model`` normalize with, and keep, its running statistics, in training mode
    too; weight and bias stay trainable and the input still gets its gradient (through ``(x - running_mean) /
    sqrt(running_var + eps)``, the statistics constants).

    A per-layer flag (``stats_frozen``) that the layers' forward reads, so it survives ``model.train()``; it is not
    saved in the state_dict. Undo with :func:`unfreeze_stats`. torch.nn batch-norm layers do not read the flag:
    convert the model with :func:`convert` first. normlab's FrozenBatchNorm2d is frozen already and left alone.

    Returns:
        ``model``, changed in place.

    Raises:
        TypeError: ``model`` is not a Module, or has torch.nn batch-norm layers (named in the message).
        ValueError: a batch-norm layer has no running statistics (``track_running_stats=False``).
    """
    layers = _batch_norms(model, "freeze_stats")
    untracked = [name for name, m in layers if m.running_mean is None]
    if untracked:
        raise ValueError(f"freeze_stats: these batch-norm layers have no running statistics to freeze "
                         f"(track_running_stats=False): {', '.join(untracked)}")
    for _, m in layers:
        m.stats_frozen = True
    return model


def unfreeze_stats(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_stats`: batch norms use and update batch statistics in training mode again. Returns
    ``model``."""
    for _, m in _batch_norms(model, "unfreeze_stats"):
        m.stats_frozen = False
    return model


# ---- folding ----------------------------------------------------------------------------------------------------

_FOLDABLE_INTO = (nn.modules.conv._ConvNd, nn.Linear)


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """Fold each eval-mode batch norm into the convolution or linear layer directly before it, for inference.

    Folded pairs are consecutive entries of an ``nn.Sequential``: Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (on
    ``(N, features)`` inputs), then a batch norm (torch.nn's or normlab's BatchNorm1d/2d/3d, normlab's or
    torchvision's FrozenBatchNorm2d). The layer before takes ``w' = w · s`` and ``b' = (b - running_mean) · s + β``
    per output channel, ``s = γ / sqrt(running_var + eps)`` (computed in float64, stored in the layer's dtype); the
    norm becomes ``nn.Identity``, or its fused activation's module (``placement="before"``). Pairs written in a
    ``forward`` method (``self.bn1(self.conv1(x))``) are not seen, nor norms with an activation placed before them.

    Returns:
        ``model``, changed in place (the folded layers' weights and biases; a bias Parameter is added where there was
        none).

    Raises:
        TypeError: ``model`` is not a torch.nn.Module.
        ValueError: a batch norm to fold is in training mode (call ``model.eval()`` first; frozen statistics, see
            :func:`freeze_stats`, fold in either mode) or has no running statistics; the message names it. Nothing
            is changed then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_bn expects a torch.nn.Module, got {type(model).__name__}")
    names = {m: name for name, m in model.named_modules()}
    norms = (nn.modules.batchnorm._BatchNorm, nl.FrozenBatchNorm2d, *_torchvision_frozen())
    pairs = []
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        keys = list(seq._modules)
        for first, second in zip(keys, keys[1:]):
            layer, bn = seq._modules[first], seq._modules[second]
            if (isinstance(layer, _FOLDABLE_INTO) and isinstance(bn, norms)
                    and getattr(bn, "placement", "before") == "before"):
                pairs.append((seq, second, layer, bn))
    for _, _, layer, bn in pairs:  # check everything before changing anything
        where = f"fold_bn: batch norm {names[bn]!r}"
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training and not getattr(bn, "stats_frozen", False):
            raise ValueError(f"{where} is in training mode, where it normalizes with batch statistics; call "
                             "model.eval() first")
        if bn.running_mean is None:
            raise ValueError(f"{where} has no running statistics (track_running_stats=False)")
        out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if out != bn.running_mean.numel():
            raise ValueError(f"{where} has {bn.running_mean.numel()} channels, but {names[layer]!r} before it gives "
                             f"{out}")
    for seq, key, layer, bn in pairs:
        _fold(layer, bn)
        act = getattr(bn, "activation", None)
        seq._modules[key] = nn.Identity() if act is None else ACTIVATION_MODULES[act](bn.negative_slope)
    return model


def _fold(layer: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s eval-mode transform into ``layer``'s weight and bias, in place."""
    f64 = torch.float64
    scale = (bn.running_var.to(f64) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(f64)
    shift = -bn.running_mean.to(f64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(f64)
    w = layer.weight
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, *k)
        g = layer.groups
        s = scale.reshape(g, 1, -1, *[1] * (w.dim() - 2))
        folded = (w.to(f64).reshape(g, w.shape[0] // g, *w.shape[1:]) * s).reshape(w.shape)
    else:  # weight (out, ...)
        folded = w.to(f64) * scale.reshape(-1, *[1] * (w.dim() - 1))
    w.copy_(folded)
    if layer.bias is None:
        layer.bias = nn.Parameter(shift.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(layer.bias.to(f64) * scale + shift)
