"""One spec for the four norms: every input is viewed as ``(N, G, K, R)``.

Batch, instance, group and layer norm compute the same thing,

    mean = E[x],  var = E[(x - mean)^2],  rstd = 1/sqrt(var + eps)
    xhat = (x - mean) * rstd,  y = xhat * w + b,

and differ only in three facts, which this module alone decides:

- the groups ``G`` whose members share one mean and one variance,
- whether the statistics also pool over the batch axis (batch norm) or are taken per sample,
- the affine shape: ``w`` and ``b`` hold one value per channel, or one per normalized element (layer norm).

An input of logical shape ``(N, C, *S)`` (layer norm: ``(*B, *D)``) is viewed as ``x4 = (N, G, K, R)``:

=========  ================  ===  ============  ========  ==========
kind       N                 G    K             R         pool over N
=========  ================  ===  ============  ========  ==========
batch      N                 C    1             prod(S)   yes
instance   N                 C    1             prod(S)   no
group      N                 G    C / G         prod(S)   no
layer      prod(B)           1    prod(D)       1         no
=========  ================  ===  ============  ========  ==========

Statistics reduce ``x4`` over ``stat_axes`` (``(0, 2, 3)`` or ``(2, 3)``) and have shape ``stat_shape``
(``(1, G)`` or ``(N, G)``); ``w`` and ``b`` have ``G * K`` entries and broadcast as ``(1, G, K, 1)``; their
gradients reduce over ``affine_axes = (0, 3)``. Nothing outside this module branches on the kind.

This module is pure Python: the NumPy reference and every backend read the same plan. One call of a norm travels
through the tiers as one frozen :class:`Call` (plan, eps, activation, placement, negative slope, and whether the
input's own statistics normalize), built once per shape by :func:`call`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

Kind = Literal["batch", "instance", "group", "layer"]
KINDS: tuple[str, ...] = ("batch", "instance", "group", "layer")

# The activations a norm can fuse, and where: "before" = norm -> activation (the paper's BN before the
# non-linearity), "after" = activation -> norm. Each tier implements them (NumPy in reference.py, torch in
# activations.py, Triton in kernels/norm.py) under these names.
ACTIVATIONS: tuple[str, ...] = ("gelu", "leaky_relu", "relu", "sigmoid", "silu", "tanh")
PLACEMENTS: tuple[str, ...] = ("before", "after")
LEAKY_SLOPE = 0.01  # torch.nn.LeakyReLU's default negative slope; "gelu" is the exact (erf) form, as nn.GELU()


def check_activation(activation: str | None, placement: str, negative_slope: float = LEAKY_SLOPE) -> None:
    """Raise ``ValueError`` for an activation or placement outside :data:`ACTIVATIONS` / :data:`PLACEMENTS`, for
    ``placement="after"`` with no activation, and for a ``negative_slope`` without ``"leaky_relu"``."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or one of {list(ACTIVATIONS)}, got {activation!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == "after" and activation is None:
        raise ValueError("placement='after' (the norm after an activation) needs an activation, got activation=None")
    if not isinstance(negative_slope, (int, float)) or negative_slope != negative_slope:
        raise ValueError(f"negative_slope must be a number, got {negative_slope!r}")
    if negative_slope != LEAKY_SLOPE and activation != "leaky_relu":
        raise ValueError(f"negative_slope applies to activation='leaky_relu' only, got activation={activation!r}")


def check_eps(eps: float) -> None:
    """``eps`` must be > 0 (NaN is refused too)."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def check_momentum(momentum: float | None) -> None:
    """``momentum`` must be None (cumulative average) or a number in [0, 1]."""
    if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum <= 1):
        raise ValueError(f"momentum must be None or a number in [0, 1], got {momentum!r}")


def check_virtual_batch_size(virtual_batch_size: int | None) -> None:
    """``virtual_batch_size`` (ghost batch norm) must be None or an int >= 1."""
    v = virtual_batch_size
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise ValueError(f"virtual_batch_size must be None or an int >= 1, got {v!r}")


def check_renorm_limits(rmax: float, dmax: float) -> None:
    """Batch renorm's clipping limits: ``rmax >= 1`` (r is clipped to [1/rmax, rmax]) and ``dmax >= 0`` (d to
    [-dmax, dmax]); both real numbers (inf allowed: no clipping), NaN refused."""
    for name, value, low in (("rmax", rmax, 1), ("dmax", dmax, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
            raise ValueError(f"{name} must be a number >= {low}, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """How an input of a given shape is normalized, as the view ``(N, G, K, R)``.

    Attributes:
        kind: ``"batch"``, ``"instance"``, ``"group"`` or ``"layer"``.
        shape: the logical input shape.
        N, G, K, R: the view's sizes; ``N * G * K * R == prod(shape)``.
        pool_batch: statistics pool over N as well (batch norm) instead of per sample.
        normalized_ndim: for layer norm, how many trailing dims are normalized (0 for the other kinds).

    Derived, computed once (a Plan is read on every call):
        view_shape: ``(N, G, K, R)``.
        stat_axes: axes of the view that one statistic reduces over: ``(0, 2, 3)`` pooled, else ``(2, 3)``.
        affine_axes: axes of the view that ``dw`` and ``db`` reduce over, ``(0, 3)``.
        stat_shape: shape of ``mean`` and ``rstd``: ``(1, G)`` when pooling over the batch, else ``(N, G)``.
        affine_size: entries of ``w`` and ``b``, ``G * K`` (channels, or normalized elements).
        m: how many values one statistic is taken over.
        numel: ``N * G * K * R``.
    """

    kind: str
    shape: tuple[int, ...]
    N: int
    G: int
    K: int
    R: int
    pool_batch: bool
    normalized_ndim: int = 0
    view_shape: tuple[int, int, int, int] = field(init=False, compare=False, repr=False)
    stat_axes: tuple[int, ...] = field(init=False, compare=False, repr=False)
    affine_axes: tuple[int, ...] = field(init=False, compare=False, repr=False)
    stat_shape: tuple[int, int] = field(init=False, compare=False, repr=False)
    affine_size: int = field(init=False, compare=False, repr=False)
    m: int = field(init=False, compare=False, repr=False)
    numel: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        derived = {
            "view_shape": (self.N, self.G, self.K, self.R),
            "stat_axes": (0, 2, 3) if self.pool_batch else (2, 3),
            "affine_axes": (0, 3),
            "stat_shape": (1 if self.pool_batch else self.N, self.G),
            "affine_size": self.G * self.K,
            "m": self.K * self.R * (self.N if self.pool_batch else 1),
            "numel": self.N * self.G * self.K * self.R,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set once, here


@dataclass(frozen=True)
class Call:
    """One call of a norm, as every tier sees it.

    Attributes:
        plan: the :class:`Plan` of the input's shape.
        eps: added to the variance.
        activation: the fused activation (a name in :data:`ACTIVATIONS`) or None.
        placement: ``"before"`` (``y = f(norm(x))``) or ``"after"`` (``y = norm(f(x))``).
        negative_slope: leaky_relu's slope for negative inputs.
        use_input_stats: the input's own statistics normalize (training); else given ones (running statistics),
            which are constants of the graph.
    """

    plan: Plan
    eps: float
    activation: str | None = None
    placement: str = "before"
    negative_slope: float = LEAKY_SLOPE
    use_input_stats: bool = True


class Running(NamedTuple):
    """A layer's running statistics, as the tiers update them.

    Attributes:
        mean, var: ``(C,)`` buffers, updated in place (var receives the unbiased batch variance).
        momentum: the moving-average factor, or None for the cumulative average over ``num_batches_tracked``.
        num_batches_tracked: scalar long buffer counting batches folded in, or None.
        num_skipped: scalar long buffer counting batches kept out for non-finite statistics, or None.
    """

    mean: Any
    var: Any
    momentum: float | None
    num_batches_tracked: Any = None
    num_skipped: Any = None


def make_call(
    kind: str,
    shape: tuple[int, ...],
    eps: float,
    activation: str | None = None,
    placement: str = "before",
    negative_slope: float = LEAKY_SLOPE,
    use_input_stats: bool = True,
    groups: int | None = None,
    normalized_ndim: int | None = None,
) -> Call:
    """The :class:`Call` for normalizing an input of ``shape`` as ``kind`` (:func:`call` caches it). Raises
    ``ValueError`` as :func:`plan` and :func:`check_activation` do, and for ``eps`` not > 0."""
    check_eps(eps)
    check_activation(activation, placement, negative_slope)
    p = plan(kind, shape, groups=groups, normalized_ndim=normalized_ndim)
    return Call(p, float(eps), activation, placement, float(negative_slope), bool(use_input_stats))


# A training loop meets a handful of shapes: each Call is built once, then found by its arguments.
call = functools.lru_cache(maxsize=4096)(make_call)


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for v in xs:  # a plain loop: torch.compile traces it, where it graph-breaks on math.prod of a generator
        out *= v
    return out


def plan(kind: str, shape: Sequence[int], *, groups: int | None = None, normalized_ndim: int | None = None) -> Plan:
    """Build the :class:`Plan` for normalizing an input of ``shape`` as ``kind``.

    Args:
        kind: one of :data:`KINDS`.
        shape: logical input shape, ``(N, C, *S)`` for batch/instance/group norm, ``(*B, *D)`` for layer norm.
        groups: number of groups (group norm only); must divide C.
        normalized_ndim: number of trailing dims D normalized together (layer norm only).

    Raises:
        ValueError: unknown kind, too few dims, or groups not dividing the channels.
    """
    shape = tuple(shape)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "layer":
        if normalized_ndim is None or not 1 <= normalized_ndim <= len(shape):
            raise ValueError(
                f"layer norm needs 1 <= normalized_ndim <= input dims ({len(shape)}), got {normalized_ndim}"
            )
        lead, norm = shape[: len(shape) - normalized_ndim], shape[len(shape) - normalized_ndim :]
        k = normalized_ndim
        return Plan(kind, shape, N=_prod(lead), G=1, K=_prod(norm), R=1, pool_batch=False, normalized_ndim=k)
    if len(shape) < 2:
        raise ValueError(f"{kind} norm expects an input of shape (N, C, *S) with at least 2 dims, got shape {shape}")
    n, c, spatial = shape[0], shape[1], _prod(shape[2:])
    if kind == "group":
        if groups is None or groups <= 0:
            raise ValueError(f"group norm needs a positive number of groups, got {groups}")
        if c % groups:
            raise ValueError(f"num_groups ({groups}) must divide the number of channels ({c})")
        return Plan(kind, shape, N=n, G=groups, K=c // groups, R=spatial, pool_batch=False)
    return Plan(kind, shape, N=n, G=c, K=1, R=spatial, pool_batch=(kind == "batch"))
