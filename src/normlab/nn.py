"""Drop-in norm layers: torch.nn's classes with normlab's forward and an optional fused activation.

Each class subclasses its torch.nn namesake, so the constructor arguments, defaults, parameters, buffers,
``state_dict`` keys, checkpoint upgrades and ``isinstance`` checks are torch's own; only ``forward`` is
normlab's. Every class also takes ``activation=None, placement="before", negative_slope=0.01`` (see
:mod:`normlab.functional`): ``BatchNorm2d(64, activation="relu")`` is the fused BN+ReLU layer. ``eps`` must be > 0 and
``momentum`` None or in [0, 1]; both are checked when the layer is built, and the error names the layer.
:class:`FrozenBatchNorm2d` is torchvision's layer of that name (a plain Module of four buffers) with normlab's
forward.

Two more of the family: ``BatchRenorm1d/2d/3d`` (batch renormalization, with :func:`renorm_schedule` and
:func:`set_renorm_limits`) and ghost batch norm, ``virtual_batch_size=`` on the batch-norm layers (see
:func:`normlab.functional.batch_renorm` and :func:`normlab.functional.batch_norm`).

Beyond torch, the batch-norm layers keep a batch whose statistics are not finite out of the running buffers
(torch poisons them with NaN), count such batches in the non-persistent buffer ``num_skipped_updates`` (not in
``state_dict``, so checkpoints stay torch's), and warn once. The check runs on the device without a host sync;
the warning is raised at once for CPU inputs and, for other devices, when the layer is switched to eval mode.
"""

from __future__ import annotations

import warnings

import torch

from normlab import distributed
from normlab import functional as F
from normlab.spec import (
    LEAKY_SLOPE,
    check_activation,
    check_eps,
    check_momentum,
    check_renorm_limits,
    check_virtual_batch_size,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm2d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "SyncBatchNorm",
    "renorm_schedule",
    "set_renorm_limits",
]


class _Fused:
    """What every normlab layer adds to its torch.nn base: the fused activation, and checks at construction."""

    activation: str | None
    placement: str
    negative_slope: float

    def _setup(self, activation: str | None, placement: str, negative_slope: float) -> None:
        who = type(self).__name__
        try:
            check_activation(activation, placement, negative_slope)
            check_eps(self.eps)
            check_momentum(getattr(self, "momentum", None))
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        self.activation, self.placement, self.negative_slope = activation, placement, negative_slope

    def _check(self, check, *args) -> None:
        """Run ``check(*args)``; its ValueError names the layer."""
        try:
            check(*args)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self.activation is None:
            return base
        slope = f", negative_slope={self.negative_slope}" if self.negative_slope != LEAKY_SLOPE else ""
        return f"{base}, activation={self.activation!r}, placement={self.placement!r}{slope}"

    def _fused(self) -> dict:
        return {"activation": self.activation, "placement": self.placement, "negative_slope": self.negative_slope}


class _BatchNorm(_Fused):
    """normlab's forward for torch.nn's ``_BatchNorm`` subclasses (BatchNorm1d/2d/3d).

    ``stats_frozen`` (set by :func:`normlab.freeze_stats`): in training mode too, the running statistics normalize
    and stay as they are, as in eval mode, while gradients still reach the input, weight and bias.
    """

    stats_frozen: bool = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
        virtual_batch_size: int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)  # by name: SyncBatchNorm takes process_group where the others take device
        self._setup(activation, placement, negative_slope)
        self._check(check_virtual_batch_size, virtual_batch_size)
        self.virtual_batch_size = virtual_batch_size
        self.register_buffer("num_skipped_updates", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._warned_skipped = False

    def extra_repr(self) -> str:
        v = self.virtual_batch_size
        return super().extra_repr() + ("" if v is None else f", virtual_batch_size={v}")

    def _check_channels(self, input: torch.Tensor) -> None:
        self._check_input_dim(input)
        if input.size(1) != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) expects {self.num_features} channels at dim 1, "
                f"got input of shape {tuple(input.shape)}"
            )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_channels(input)
        # Parameters and buffers straight from their dicts: Module.__getattr__ costs as much as a small norm.
        params, buffers = self._parameters, self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        training = self.training and not self.stats_frozen
        track = training and self.track_running_stats
        pass_buffers = not training or self.track_running_stats
        y = self._batch_norm(
            input,
            running_mean if pass_buffers else None,
            running_var if pass_buffers else None,
            params["weight"],
            params["bias"],
            training or running_mean is None,
            self.momentum,
            self.eps,
            self.activation,
            self.placement,
            negative_slope=self.negative_slope,
            num_batches_tracked=buffers["num_batches_tracked"] if track else None,
            num_skipped=buffers["num_skipped_updates"] if track else None,
            virtual_batch_size=self.virtual_batch_size if training else None,  # eval: plain batch norm
        )
        if track and not self._warned_skipped and input.is_cpu:
            self._warn_skipped()
        return y

    _batch_norm = staticmethod(F.batch_norm)  # a method where the norm differs (SyncBatchNorm)

    def train(self, mode: bool = True):
        if not mode:
            self._warn_skipped()
        return super().train(mode)

    def _warn_skipped(self) -> None:
        if self._warned_skipped or torch.compiler.is_compiling():
            return
        skipped = int(self._buffers["num_skipped_updates"])
        if skipped:
            self._warned_skipped = True
            warnings.warn(
                f"{type(self).__name__}: {skipped} batch(es) with non-finite statistics were kept out of "
                "running_mean/running_var (see num_skipped_updates)",
                RuntimeWarning,
                stacklevel=3,
            )


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """Batch norm over ``(N, C)`` or ``(N, C, L)``: torch.nn.BatchNorm1d with normlab's forward."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """Batch norm over ``(N, C, H, W)``: torch.nn.BatchNorm2d with normlab's forward."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """Batch norm over ``(N, C, D, H, W)``: torch.nn.BatchNorm3d with normlab's forward."""


class SyncBatchNorm(_BatchNorm, torch.nn.SyncBatchNorm):
    """Batch norm over ``(N, C, *S)`` with the statistics of the global batch of a torch.distributed process group.

    torch.nn.SyncBatchNorm with normlab's forward (see :mod:`normlab.distributed`): in training, with an initialized
    group of more than one rank, every rank's shard (of any size, empty included) is normalized with the exact
    statistics of all shards together; otherwise (eval, one process, no group) it is normlab's BatchNorm. Takes the
    fused activation like the other layers. ``process_group``: None (the default group) or a ProcessGroup.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        distributed.check_process_group(process_group, type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         activation=activation, placement=placement, negative_slope=negative_slope)
        self.process_group = process_group

    def _batch_norm(self, *args, virtual_batch_size=None, **kwargs) -> torch.Tensor:
        group = distributed.sync_group(self.process_group) if self.training else None
        if group is None:
            return F.batch_norm(*args, **kwargs)
        return distributed.sync_batch_norm(*args, group=group, who=f"{type(self).__name__}({self.num_features})",
                                           **kwargs)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """``module`` with every batch-norm layer, torch.nn's or normlab's, replaced by a normlab SyncBatchNorm that
        shares its parameters and buffers and keeps its training flag, activation, placement and negative slope."""
        return distributed.convert_sync_batchnorm(cls, module, process_group)


class _BatchRenorm(_BatchNorm):
    """Batch renormalization (Ioffe 2017) for torch.nn's ``_BatchNorm`` subclasses: :func:`normlab.functional.
    batch_renorm` in training, plain batch norm in eval.

    ``rmax`` and ``dmax`` are 0-D non-persistent buffers (so ``state_dict`` keys are torch's BatchNorm's, and a
    schedule that changes them every step does not recompile under ``torch.compile``); set them with
    :meth:`set_limits` or :func:`set_renorm_limits`. The running statistics are always tracked.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias, activation=activation,
                         placement=placement, negative_slope=negative_slope)
        self._check(check_renorm_limits, rmax, dmax)
        rdt = self.running_mean.dtype
        self.register_buffer("rmax", torch.tensor(float(rmax), dtype=rdt, device=device), persistent=False)
        self.register_buffer("dmax", torch.tensor(float(dmax), dtype=rdt, device=device), persistent=False)

    def set_limits(self, rmax: float, dmax: float) -> None:
        """Set the clipping limits (r to [1/rmax, rmax], d to [-dmax, dmax]); ``rmax >= 1``, ``dmax >= 0``."""
        self._check(check_renorm_limits, rmax, dmax)
        with torch.no_grad():
            self.rmax.fill_(rmax)
            self.dmax.fill_(dmax)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={float(self.rmax)}, dmax={float(self.dmax)}"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_channels(input)
        params, buffers = self._parameters, self._buffers
        training = self.training and not self.stats_frozen
        y = F.batch_renorm(
            input,
            buffers["running_mean"],
            buffers["running_var"],
            params["weight"],
            params["bias"],
            training,
            self.momentum,
            self.eps,
            buffers["rmax"],
            buffers["dmax"],
            self.activation,
            self.placement,
            negative_slope=self.negative_slope,
            num_batches_tracked=buffers["num_batches_tracked"] if training else None,
            num_skipped=buffers["num_skipped_updates"] if training else None,
        )
        if training and not self._warned_skipped and input.is_cpu:
            self._warn_skipped()
        return y


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    """Batch renorm over ``(N, C)`` or ``(N, C, L)``; a torch.nn.BatchNorm1d in its parameters, buffers and eval."""


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    """Batch renorm over ``(N, C, H, W)``; a torch.nn.BatchNorm2d in its parameters, buffers and eval."""


class BatchRenorm3d(_BatchRenorm, torch.nn.BatchNorm3d):
    """Batch renorm over ``(N, C, D, H, W)``; a torch.nn.BatchNorm3d in its parameters, buffers and eval."""


def renorm_schedule(
    step: int,
    warmup_steps: int,
    ramp_steps: int | tuple[int, int],
    rmax: float = 3.0,
    dmax: float = 5.0,
) -> tuple[float, float]:
    """Batch renorm's limits ``(rmax, dmax)`` at training ``step``, as the paper relaxes them.

    ``(1.0, 0.0)`` (plain batch norm) for steps ``< warmup_steps``; then each limit moves linearly to its target over
    its ramp (``ramp_steps``: one length for both, or ``(rmax's, dmax's)``), and stays there. The paper's schedule
    (rmax 1 -> 3 by step 40k, dmax 0 -> 5 by step 25k, both from step 5k) is
    ``renorm_schedule(step, 5000, (35000, 20000))``.
    """
    check_renorm_limits(rmax, dmax)
    r_ramp, d_ramp = (ramp_steps, ramp_steps) if isinstance(ramp_steps, int) else ramp_steps
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("ramp_steps", r_ramp), ("ramp_steps", d_ramp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"renorm_schedule: {name} must be an int >= 0 (or a pair of them), got {value!r}")

    def relaxed(start: float, end: float, ramp: int) -> float:
        done = 1.0 if ramp == 0 else min(max(step - warmup_steps, 0) / ramp, 1.0)
        return start + (end - start) * done if step >= warmup_steps else start

    return relaxed(1.0, float(rmax), r_ramp), relaxed(0.0, float(dmax), d_ramp)


def set_renorm_limits(module: torch.nn.Module, rmax: float, dmax: float) -> int:
    """Set ``rmax`` and ``dmax`` on every batch-renorm layer in ``module`` (itself included); returns how many."""
    layers = [m for m in module.modules() if isinstance(m, _BatchRenorm)]
    for m in layers:
        m.set_limits(rmax, dmax)
    return len(layers)


class _InstanceNorm(_Fused):
    """normlab's forward for torch.nn's ``_InstanceNorm`` subclasses; torch's forward keeps the input checks."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self._setup(activation, placement, negative_slope)

    def _apply_instance_norm(self, input: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
            **self._fused(),
        )


class InstanceNorm1d(_InstanceNorm, torch.nn.InstanceNorm1d):
    """Instance norm over ``(N, C, L)`` or unbatched ``(C, L)``."""


class InstanceNorm2d(_InstanceNorm, torch.nn.InstanceNorm2d):
    """Instance norm over ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""


class InstanceNorm3d(_InstanceNorm, torch.nn.InstanceNorm3d):
    """Instance norm over ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``."""


class GroupNorm(_Fused, torch.nn.GroupNorm):
    """Group norm over ``(N, C, *)``: torch.nn.GroupNorm with normlab's forward."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)
        self._setup(activation, placement, negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expects input (N, {self.num_channels}, *), "
                f"got shape {tuple(input.shape)}"
            )
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, **self._fused())


class LayerNorm(_Fused, torch.nn.LayerNorm):
    """Layer norm over the trailing ``normalized_shape`` dims: torch.nn.LayerNorm with normlab's forward."""

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._setup(activation, placement, negative_slope)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, **self._fused())


class FrozenBatchNorm2d(_Fused, torch.nn.Module):
    """Batch norm over ``(N, C, H, W)`` with fixed statistics and affine parameters, as torchvision's.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are ``(C,)`` buffers (nothing trains, nothing
    updates, in either mode), so the ``state_dict`` is :class:`torchvision.ops.FrozenBatchNorm2d`'s; a batch-norm
    checkpoint loads too (its ``num_batches_tracked`` is dropped). The forward is normlab's eval-mode batch norm,
    with an optional fused activation; the input still receives its gradient.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        activation: str | None = None,
        placement: str = "before",
        negative_slope: float = LEAKY_SLOPE,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.num_features, self.eps = num_features, eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill, device=device, dtype=dtype))
        self._setup(activation, placement, negative_slope)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d checkpoint has it; torchvision drops it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}" + super().extra_repr()  # _Fused's: the activation, if any

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 4 or input.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm2d({self.num_features}) expects input (N, {self.num_features}, H, W), "
                f"got shape {tuple(input.shape)}"
            )
        buffers = self._buffers
        return F.batch_norm(input, buffers["running_mean"], buffers["running_var"], buffers["weight"],
                            buffers["bias"], False, 0.0, self.eps, **self._fused())
