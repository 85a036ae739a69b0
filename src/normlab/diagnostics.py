"""Hooks to attach to your own model: what each normalization layer sees over training.

:class:`NormMonitor` registers a forward hook on every normalization layer of a model (or on the modules you
name) and, every ``every``-th forward call, records per layer:

- the percentiles of the layer's input (what it normalizes; for a fused layer with ``placement="after"`` that is
  ``f(x)``), or of its output with ``where="output"``: the quantity of the paper's Figure 1(b, c);
- for batch-norm layers with running statistics, in training mode, the train/eval gap: how far this batch's
  statistics, which normalize in training, are from the running ones, which normalize in eval mode
  (``mean_gap`` = mean over channels of |batch mean - running mean|, ``mean_gap_rel`` the same in running standard
  deviations, ``var_ratio`` = mean over channels of batch variance / running variance; 0, 0 and 1 when they agree).
  They are measured before the layer updates its running statistics with the batch.

:func:`batch_noise` measures the noise batch norm injects in training: how much one example's normalized value
moves when the other examples of its mini-batch change (the paper's "random scale and shift"), per batch size.

Example::

    monitor = NormMonitor(model, every=100)
    for step, (x, y) in enumerate(loader):
        monitor.step = step                      # records carry it (default: the layer's forward-call count)
        loss = F.cross_entropy(model(x), y)
        ...
    monitor.remove()
    monitor.history("bn1", "p50")               # [(step, median of bn1's input), ...]

Statistics are computed in float64 on a copy: the model's computation and its buffers are left untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from normlab import activations
from normlab.spec import LEAKY_SLOPE, plan
from normlab.torch_ops import view4

PERCENTILES = (15, 50, 85)  # the paper's Figure 1(b, c)
# torch.nn's norm bases; normlab.nn's layers subclass them. _NormBase covers batch, sync-batch and instance norm.
NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
MODES = ("train", "eval", "any")
WHERE = ("input", "output")


def norm_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The normalization layers of ``model`` by their ``named_modules`` names (``type(m).__name__`` for the root)."""
    return {name or type(m).__name__: m for name, m in model.named_modules() if isinstance(m, NORM_TYPES)}


def percentiles(values, q: Sequence[float] = PERCENTILES) -> dict[str, float]:
    """The ``q`` percentiles of all of ``values`` (a tensor or an array, any shape), in float64: ``{"p15": ..}``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to(torch.float64).cpu().numpy()
    qs = np.percentile(np.asarray(values, dtype=np.float64), q)
    return {f"p{p:g}": float(v) for p, v in zip(q, qs)}


def channel_skewness(x: torch.Tensor) -> torch.Tensor:
    """The skewness ``E[(x - mean)³] / std³`` of each channel of ``x`` ``(N, C, *S)`` over ``N`` and ``S``: ``(C,)``
    float64 (biased moments); NaN for a channel with zero variance (a dead ReLU unit), which has none.

    It is unchanged by a positive per-channel scale and shift, so on a batch-norm layer's input it is also the
    skewness of the normalized values ``xhat`` (and of ``w * xhat + b`` for ``w > 0``).
    """
    p = plan("batch", x.shape)
    x4 = view4(x.detach(), p).to(torch.float64)
    d = x4 - x4.mean(dim=p.stat_axes, keepdim=True)
    d2 = d * d
    var = d2.mean(dim=p.stat_axes).reshape(-1)
    m3 = (d2 * d).mean(dim=p.stat_axes).reshape(-1)
    return torch.where(var > 0, m3 / var.clamp_min(torch.finfo(torch.float64).tiny) ** 1.5, torch.nan)


def normalized_input(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``module`` normalizes given its input ``x``: ``x``, or ``f(x)`` for a fused layer with
    ``placement="after"`` (``y = norm(f(x))``)."""
    f = activations.get(getattr(module, "activation", None), getattr(module, "negative_slope", LEAKY_SLOPE))
    return f.fn(x) if f is not None and getattr(module, "placement", "before") == "after" else x


def stats_distance(mean: torch.Tensor, var: torch.Tensor, ref_mean: torch.Tensor, ref_var: torch.Tensor,
                   eps: float) -> dict[str, float]:
    """How far per-channel statistics ``mean``, ``var`` ``(C,)`` are from reference ones ``ref_mean``, ``ref_var``
    ``(C,)``, averaged over the channels in float64: ``mean_gap`` = mean |mean - ref_mean|, ``mean_gap_rel`` the
    same in reference standard deviations ``sqrt(ref_var + eps)``, ``var_ratio`` = mean of var / ref_var (0, 0 and
    1 when they agree)."""
    mean, var, ref_mean, ref_var = (t.detach().to(torch.float64).reshape(-1) for t in (mean, var, ref_mean, ref_var))
    gap = (mean - ref_mean).abs()
    return {
        "mean_gap": gap.mean().item(),
        "mean_gap_rel": (gap / torch.sqrt(ref_var + eps)).mean().item(),
        "var_ratio": (var / ref_var).mean().item(),
    }


def stats_gap(module: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The gap between the batch statistics of ``x`` ``(N, C, *S)`` and ``module``'s running ones, per channel,
    averaged (:func:`stats_distance`, with the running statistics as the reference; the batch variance is the
    biased one that normalizes in training)."""
    p = plan("batch", x.shape)
    var, mean = torch.var_mean(view4(x.detach(), p).to(torch.float64), dim=p.stat_axes, correction=0)
    return stats_distance(mean, var, module.running_mean, module.running_var, module.eps)


def batch_noise(x: torch.Tensor, batch_sizes: Sequence[int], *, example: int = 0, draws: int = 256,
                eps: float = 1e-5, seed: int = 0) -> dict[int, float]:
    """How much batch norm's batch statistics move one example's normalized value, per batch size.

    ``x`` ``(N, C, *S)`` is a pool of what a batch-norm layer normalizes (its input over N examples). For each
    ``m`` in ``batch_sizes``, ``draws`` mini-batches are formed of example ``example`` and ``m - 1`` others drawn
    without replacement from the rest of the pool; in each, the example's value is normalized with the
    mini-batch's statistics, as batch norm does in training (per channel over the batch and ``S``, biased
    variance): ``xhat = (x_i - mean_B) / sqrt(var_B + eps)`` (before the affine). Returns ``{m: std}``: the std
    over the draws of ``xhat``, averaged over channels (and positions). For large ``m`` it falls like
    ``sqrt((1 + z² (kurtosis - 1) / 4) / m)``, ``z`` the example's population-normalized value (the mean's and
    the variance's sampling noise); at ``m = 2`` every ``xhat`` is about ±1. The draws are seeded by ``seed``
    alone (the same batches on every call); memory is ``draws * max(m) * C * prod(S)`` float64 values.
    """
    p = plan("batch", x.shape)  # raises on fewer than two dims
    n = p.N
    if not 0 <= example < n:
        raise ValueError(f"batch_noise: example must be in [0, {n}) (the pool's size), got {example}")
    if not (isinstance(draws, int) and draws >= 2):
        raise ValueError(f"batch_noise: draws must be an int >= 2 (a std needs two), got {draws!r}")
    bad = [m for m in batch_sizes if not 2 <= m <= n]
    if bad:
        raise ValueError(f"batch_noise: batch sizes must be in [2, {n}] (the pool's size), got {bad}")
    # (N, R, C): one channel's values of a batch are then one strided reduction over contiguous rows
    xs = view4(x.detach(), p)[:, :, 0].transpose(1, 2).to(torch.float64).contiguous()
    if not torch.isfinite(xs).all():
        raise ValueError("batch_noise: x has non-finite values")
    rng = np.random.default_rng(seed)
    rest = np.delete(np.arange(n), example)
    xi, count = xs[example], p.R  # (R, C); values per channel and example
    out = {}
    for m in batch_sizes:
        rows = torch.from_numpy(np.stack([rng.choice(rest, m - 1, replace=False) for _ in range(draws)]))
        others = xs[rows.to(xs.device)]  # (draws, m - 1, R, C)
        mean = (others.sum(dim=(1, 2)) + xi.sum(dim=0)) / (m * count)  # (draws, C)
        var = (((others - mean[:, None, None]) ** 2).sum(dim=(1, 2))
               + ((xi - mean[:, None]) ** 2).sum(dim=1)) / (m * count)  # biased, as BN normalizes in training
        xhat = (xi - mean[:, None]) * torch.rsqrt(var[:, None] + eps)  # (draws, R, C)
        out[int(m)] = xhat.std(dim=0).mean().item()
    return out


def _has_running_stats(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None


class NormMonitor:
    """Records, per layer, the percentiles of what it normalizes and its train/eval statistics gap.

    Args:
        model: whose normalization layers (:func:`norm_layers`) to watch; or None with ``layers``.
        layers: ``{name: module}`` to watch instead: any modules (an activation, a linear layer...).
        every: record at every ``every``-th forward call of each layer that matches ``mode``.
        q: the percentiles.
        where: ``"input"`` (what the layer normalizes) or ``"output"``.
        mode: record forward calls in ``"train"`` mode, ``"eval"`` mode, or ``"any"``.
        select: applied to the tensor before its percentiles are taken, e.g. ``lambda t: t[:, 0]`` for channel 0
            (the gap always uses every channel).
        gap: also record :func:`stats_gap` for batch-norm layers with running statistics in training mode.

    ``records`` is a list of dicts ``{"layer", "step", "p15", "p50", "p85"[, "mean_gap", "mean_gap_rel",
    "var_ratio"]}``; ``step`` is :attr:`step` when set, else the layer's count of matching forward calls (from 0).
    Use as a context manager, or call :meth:`remove` to detach the hooks.
    """

    def __init__(self, model: torch.nn.Module | None = None, *, layers: Mapping[str, torch.nn.Module] | None = None,
                 every: int = 1, q: Sequence[float] = PERCENTILES, where: str = "input", mode: str = "train",
                 select: Callable[[torch.Tensor], torch.Tensor] | None = None, gap: bool = True) -> None:
        if (model is None) == (layers is None):
            raise ValueError("NormMonitor: give either a model or layers={name: module}, not both or neither")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"NormMonitor: every must be an int >= 1, got {every!r}")
        if where not in WHERE:
            raise ValueError(f"NormMonitor: where must be one of {WHERE}, got {where!r}")
        if mode not in MODES:
            raise ValueError(f"NormMonitor: mode must be one of {MODES}, got {mode!r}")
        self.layers = dict(norm_layers(model) if model is not None else layers)
        if not self.layers:
            raise ValueError("NormMonitor: the model has no normalization layer (torch.nn or normlab.nn) to watch")
        self.every, self.q, self.where, self.mode, self.select, self.gap = every, tuple(q), where, mode, select, gap
        self.step: int | None = None
        self.records: list[dict] = []
        self._calls = dict.fromkeys(self.layers, 0)
        self._handles = []
        for name, m in self.layers.items():
            if where == "input":
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name)))
            else:
                self._handles.append(m.register_forward_hook(self._post_hook(name)))

    def _due(self, name: str, module: torch.nn.Module) -> bool:
        if self.mode != "any" and module.training != (self.mode == "train"):
            return False
        n = self._calls[name]
        self._calls[name] = n + 1
        return n % self.every == 0

    def _record(self, name: str, module: torch.nn.Module, x: torch.Tensor, seen: torch.Tensor) -> None:
        call = self._calls[name] - 1
        values = self.select(seen) if self.select is not None else seen
        rec = {"layer": name, "step": self.step if self.step is not None else call, **percentiles(values, self.q)}
        if self.gap and module.training and _has_running_stats(module):
            rec.update(stats_gap(module, normalized_input(module, x)))
        self.records.append(rec)

    def _pre_hook(self, name: str):
        def hook(module, args):
            if self._due(name, module):
                x = args[0]
                self._record(name, module, x, normalized_input(module, x) if isinstance(module, NORM_TYPES) else x)

        return hook

    def _post_hook(self, name: str):
        def hook(module, args, output):
            if self._due(name, module):
                self._record(name, module, args[0], output)

        return hook

    def latest(self, layer: str) -> dict:
        """The last record of ``layer``; raises KeyError naming the layer when it has none yet."""
        for rec in reversed(self.records):
            if rec["layer"] == layer:
                return rec
        raise KeyError(f"NormMonitor: no record of layer {layer!r} yet (layers: {list(self.layers)})")

    def history(self, layer: str, key: str) -> list[tuple[int, float]]:
        """``[(step, value of key), ...]`` for ``layer``, in recording order."""
        return [(r["step"], r[key]) for r in self.records if r["layer"] == layer and key in r]

    def remove(self) -> None:
        """Detach every hook; the records stay."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> NormMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
