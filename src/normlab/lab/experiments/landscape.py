"""``normlab landscape``: why BN helps: a smoother loss landscape, not less internal covariate shift
(Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?", §2-3, Fig. 2, 4, 5).

The model factory's small CNN (``make_cnn(channels)``: 3x3 conv -> [norm ->] ReLU -> 2x2 max-pool per width, then a
linear classifier) is trained three ways side by side, on the same mini-batches and from the same conv/linear
weights: ``standard`` (no norm; the conv layers have biases), ``bn`` (BN before each ReLU) and ``noisy_bn`` (BN
followed by :class:`ShiftScaleNoise`, the paper's "noisy BatchNorm" of §2.1: a random scale and shift per sample and
channel whose distribution is itself redrawn at every training step, so that each layer's input distribution keeps
moving, "covariate shift" on purpose).

At each evaluation (:class:`Measure`): test loss and accuracy (eval mode), then, on the batch the arm trains on next,
in train mode (BN normalizes with that batch's statistics, as in the paper) with the noise, if any, frozen for the
whole measure, from the current weights θ and that batch's gradient g = ∇L(θ) (:func:`landscape`), over the step
sizes η = lr·k, k in ``step_grid``:

- ``loss_range``: max - min over the grid of L(θ - ηg) (Fig. 4a, "loss landscape");
- ``grad_range``: max - min of ‖∇L(θ) - ∇L(θ - ηg)‖ (Fig. 4b, "ℓ2 gradient predictiveness");
- ``beta``: max of ‖∇L(θ) - ∇L(θ - ηg)‖ / ‖ηg‖ (Fig. 4c, "effective β-smoothness");

and the internal covariate shift of their Definition 2.1 (:func:`ics`): for each conv/linear layer i after the
first, G = ∇ of the loss w.r.t. layer i's weight at θ and G' = the same after every parameter before layer i took
its own SGD step -lr·g (layer i and the later ones unchanged): ``ics_l2_<i>`` = ‖G - G'‖ and ``ics_cos_<i>`` =
cos(G, G'). A measure changes nothing in the network: it evaluates the loss by :func:`torch.func.functional_call`
on moved copies of the parameters and on copies of the BN running buffers, so a run measured every k steps trains
exactly the weights of an unmeasured one (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from normlab.lab import data as mnist_data
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data, mean_std, ours, seed_list, unit_key
from normlab.lab.metrics import markdown_table
from normlab.lab.models import ACTIVATION_MODULES, NORM_LAYERS, make_cnn, register_norm
from normlab.lab.registry import register

ARMS = ("standard", "bn", "noisy_bn")
LABELS = {"standard": "standard (no BN)", "bn": "BN", "noisy_bn": "noisy BN"}
NORMS = {"standard": "none", "bn": "batch", "noisy_bn": "noisy_batch"}
COLORS = {"standard": "tab:red", "bn": "tab:blue", "noisy_bn": "tab:green"}
LANDSCAPE = ("loss_range", "grad_range", "beta")
EVAL_CHUNK = 2000  # test images per forward pass (bounds the memory of the CNN's evaluation)


@dataclass
class LandscapeConfig(RunConfig):
    """Everything that decides a landscape run's numbers. CPU-sized: a few minutes on two cores."""

    steps: int = field(default=1200, metadata=ours("training steps (every network)"))
    eval_every: int = field(default=50, metadata=ours("steps between evaluations (and landscape/ICS measures)"))
    seeds: int = field(default=3, metadata={"help": "how many seeds, from --seed on: several give mean ± std"})
    lr: float = field(default=0.1, metadata=ours("SGD learning rate, the same for every network"))
    channels: tuple[int, ...] = field(default=(8, 16, 32), metadata=ours(
        "the CNN's conv widths, one 3x3 conv block and a 2x2 max-pool each"))
    step_grid: tuple[float, ...] = field(default=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0), metadata=ours(
        "the step sizes along -g of the landscape measures, as multiples of lr"))
    noise_mean: float = field(default=0.5, metadata=ours(
        "noisy BN: the per-step means of its scale and shift are drawn from U(1 ± noise_mean) and U(± noise_mean)"))
    noise_std: float = field(default=0.5, metadata=ours(
        "noisy BN: the per-step stds of its scale and shift are drawn from U(0, noise_std)"))
    test_images: int = field(default=10_000, metadata=ours("test images the accuracy is measured on (the first)"))

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [
            ("lr", self.lr > 0, "must be > 0"),
            ("channels", len(self.channels) >= 1 and all(c >= 1 for c in self.channels),
             "must be one or more widths >= 1"),
            ("step_grid", len(self.step_grid) >= 2 and all(k > 0 for k in self.step_grid)
             and list(self.step_grid) == sorted(set(self.step_grid)), "must be two or more increasing values > 0"),
            ("noise_mean", 0 <= self.noise_mean < 1, "must be in [0, 1)"),
            ("noise_std", self.noise_std >= 0, "must be >= 0"),
            ("test_images", 1 <= self.test_images <= 10_000, "must be in [1, 10000]"),
        ]


# ---------------------------------------------------------------------------------------------------------------
# noisy BN


class ShiftScaleNoise(nn.Module):
    """``y = s·x + b`` in training, with ``s``, ``b`` random per sample and channel; identity in eval mode.

    At every forward pass in training (one per step) the noise's distribution is drawn anew, the same for every
    channel: ``s ~ N(μ_s, σ_s²)`` and ``b ~ N(μ_b, σ_b²)`` with ``μ_s ~ U(1 - mean, 1 + mean)``,
    ``μ_b ~ U(-mean, mean)`` and ``σ_s, σ_b ~ U(0, std)``; then one ``s`` and one ``b`` per sample and channel
    (constant over the spatial dims, as BN's own scale and shift). Draws use the global torch RNG, which
    :class:`~normlab.lab.experiment.TorchArm` seeds per training segment. Input and output ``(N, C, *S)``.
    """

    def __init__(self, mean: float = 0.5, std: float = 0.5):
        super().__init__()
        self.mean, self.std = mean, std
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # (s, b) reused by every forward while set

    def draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh ``(s, b)``, each ``(N, C, 1, ...)``, for input ``x``."""
        shape = (*x.shape[:2], *(1,) * (x.dim() - 2))
        u = torch.rand(4, device=x.device, dtype=x.dtype)
        mu_s, mu_b = 1 + self.mean * (2 * u[0] - 1), self.mean * (2 * u[1] - 1)
        sd_s, sd_b = self.std * u[2], self.std * u[3]
        return (mu_s + sd_s * torch.randn(shape, device=x.device, dtype=x.dtype),
                mu_b + sd_b * torch.randn(shape, device=x.device, dtype=x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        s, b = self.frozen if self.frozen is not None else self.draw(x)
        return x * s + b

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


def _noisy_batch(channels, dims, *, activation=None, placement="before", **options):
    layers = [NORM_LAYERS["batch"].build(channels, dims, **options), ShiftScaleNoise()]
    if activation is not None:
        act = ACTIVATION_MODULES[activation]()
        layers = [*layers, act] if placement == "before" else [act, *layers]
    return nn.Sequential(*layers)


def ensure_noisy_bn() -> None:
    """Register norm kind ``"noisy_batch"`` (BN, then :class:`ShiftScaleNoise`) with the model factory, once."""
    if "noisy_batch" not in NORM_LAYERS:
        register_norm("noisy_batch", _noisy_batch, centers_channels=True)


@contextmanager
def frozen_noise(net: nn.Module, x: torch.Tensor, buffers: dict):
    """Within: every :class:`ShiftScaleNoise` of ``net`` applies one fixed draw, so that repeated forward passes
    on ``x`` see the same noise. The draws come from one forward pass in train mode with ``buffers`` (copies of the
    net's buffers, which BN updates in place of its own)."""
    noises = [m for m in net.modules() if isinstance(m, ShiftScaleNoise)]
    if noises:
        def fix(module, args):
            module.frozen = module.draw(args[0])
        hooks = [m.register_forward_pre_hook(fix) for m in noises]
        try:
            with torch.no_grad():
                functional_call(net, buffers, (x,))
        finally:
            for h in hooks:
                h.remove()
    try:
        yield
    finally:
        for m in noises:
            m.frozen = None


# ---------------------------------------------------------------------------------------------------------------
# the measures


def _loss_and_grad(net: nn.Module, params: dict, buffers: dict, x, y) -> tuple[float, dict]:
    """Cross-entropy of ``net`` with ``params`` (and the buffers ``buffers``, updated in place by BN in train mode)
    on ``(x, y)``, and its gradient w.r.t. ``params``, a dict like it."""
    with torch.enable_grad():  # TorchArm.evaluate runs measures under no_grad
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = nn.functional.cross_entropy(functional_call(net, {**p, **buffers}, (x,)), y)
        grads = torch.autograd.grad(loss, list(p.values()))
    return loss.item(), dict(zip(p, grads))


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def landscape(net: nn.Module, x: torch.Tensor, y: torch.Tensor, etas: Sequence[float], buffers: dict) -> dict:
    """The landscape along -g at the current weights θ of ``net`` on the batch ``(x, y)``, over the step sizes
    ``etas``: ``loss_range`` (max - min of L(θ - ηg)), ``grad_range`` (max - min of ‖g - ∇L(θ - ηg)‖), ``beta``
    (max of ‖g - ∇L(θ - ηg)‖ / ‖ηg‖), ``loss`` (L(θ)), ``grad_norm`` (‖g‖), and ``grads`` (g, a dict by parameter
    name). The net is not changed: its parameters are read and BN updates ``buffers`` (copies) instead of its own."""
    theta = {k: p.detach() for k, p in net.named_parameters()}
    loss, g = _loss_and_grad(net, theta, buffers, x, y)
    g_norm = _norm(g.values())
    losses, diffs = [], []
    for eta in etas:
        l_eta, g_eta = _loss_and_grad(net, {k: v - eta * g[k] for k, v in theta.items()}, buffers, x, y)
        losses.append(l_eta)
        diffs.append(_norm(g[k] - g_eta[k] for k in g))
    return {"loss": loss, "grad_norm": g_norm, "grads": g,
            "loss_range": max(losses) - min(losses), "grad_range": max(diffs) - min(diffs),
            "beta": max(d / (eta * g_norm) for d, eta in zip(diffs, etas)) if g_norm > 0 else 0.0}


def weight_layers(net: nn.Sequential) -> list[int]:
    """The indices in ``net`` of its conv and linear layers, in order (the "layers" of Definition 2.1)."""
    return [i for i, m in enumerate(net) if isinstance(m, (nn.Conv2d, nn.Linear))]


def ics(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, lr: float, grads: dict, buffers: dict) -> dict:
    """Internal covariate shift (Santurkar et al. 2018, Definition 2.1) of each conv/linear layer i of ``net``
    after the first, on the batch ``(x, y)``: G = ``grads`` of layer i's weight (the gradient at θ), G' = the
    gradient of that weight after every parameter of the modules before layer i moved by ``-lr`` times its own
    gradient; returns ``{"ics_l2_<i>": ‖G - G'‖, "ics_cos_<i>": cos(G, G')}`` with i counted from 1."""
    theta = {k: p.detach() for k, p in net.named_parameters()}
    out = {}
    for n, idx in enumerate(weight_layers(net)[1:], start=2):
        before = {k: v - lr * grads[k] if int(k.split(".")[0]) < idx else v for k, v in theta.items()}
        name = f"{idx}.weight"
        g, g2 = grads[name].double().flatten(), _loss_and_grad(net, before, buffers, x, y)[1][name].double().flatten()
        denom = float(g.norm() * g2.norm())
        out[f"ics_l2_{n}"] = float((g - g2).norm())
        out[f"ics_cos_{n}"] = float(g @ g2) / denom if denom > 0 else None
    return out


class Measure:
    """What an evaluation records: test loss and accuracy (eval mode, on the first ``test_images``), then the
    landscape (:func:`landscape`) and the ICS (:func:`ics`) on the batch of the next training step, in train mode,
    with any noise frozen; the network's parameters and buffers are left exactly as they were."""

    def __init__(self, cfg: LandscapeConfig):
        self.etas = [k * cfg.lr for k in cfg.step_grid]
        self.lr, self.test_images = cfg.lr, cfg.test_images

    def __call__(self, arm: TorchArm) -> dict:
        net = arm.net
        loss, correct = 0.0, 0
        xs, ys = arm.data.test_x[:self.test_images], arm.data.test_y[:self.test_images]
        for x, y in zip(xs.split(EVAL_CHUNK), ys.split(EVAL_CHUNK)):
            logits = net(x)
            loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == y).sum())
        out = {"test_loss": loss / len(ys), "test_acc": correct / len(ys)}
        rows = torch.from_numpy(arm.order.indices(arm.step)).to(arm.data.train_x.device)
        x, y = arm.data.train_x[rows], arm.data.train_y[rows]
        buffers = {k: b.clone() for k, b in net.named_buffers()}  # BN's running updates land here, not in the net
        was_training = net.training
        net.train()
        try:
            with torch.random.fork_rng(devices=[arm.device] if arm.device.type == "cuda" else []):
                # the noise's draw: a function of (seed, step), leaving no trace in the training's RNG
                torch.manual_seed(int(np.random.SeedSequence([arm.seed, 3, arm.step]).generate_state(1)[0]))
                with frozen_noise(net, x, buffers):
                    land = landscape(net, x, y, self.etas, buffers)
                    out.update({k: land[k] for k in ("loss", "grad_norm", *LANDSCAPE)})
                    out.update(ics(net, x, y, self.lr, land["grads"], buffers))
        finally:
            net.train(was_training)
        return out


def network(arm: str, cfg: LandscapeConfig) -> nn.Sequential:
    """The ``arm`` CNN at its initial state: conv/linear weights (and the standard arm's biases) are those of a
    reference no-norm CNN seeded by ``cfg.seed`` (torch's default init), so the arms differ only in their norm."""
    ensure_noisy_bn()
    net = make_cnn(cfg.channels, norm=NORMS[arm], fuse=False)
    with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
        torch.manual_seed(cfg.seed)
        ref = make_cnn(cfg.channels, norm="none")
    with torch.no_grad():
        for i, j in zip(weight_layers(net), weight_layers(ref)):
            net[i].weight.copy_(ref[j].weight)
            if net[i].bias is not None:
                net[i].bias.copy_(ref[j].bias)
    for m in net.modules():
        if isinstance(m, ShiftScaleNoise):
            m.mean, m.std = cfg.noise_mean, cfg.noise_std
    # channels_last: torch's CPU max-pool is several times faster on it (the numbers do not depend on it)
    return net.to(memory_format=torch.channels_last)


@register
class Landscape(Experiment):
    name = "landscape"
    title = "why BN helps: loss-landscape smoothness and internal covariate shift (small CNN; BN, no BN, noisy BN)"
    config = LandscapeConfig
    quick = {"steps": 40, "eval_every": 20, "seeds": 1, "channels": (4, 8), "step_grid": (0.5, 1.0, 2.0),
             "test_images": 2000}
    figure_name = "landscape.png"
    paper = ("Santurkar, Tsipras, Ilyas & Madry 2018, How Does Batch Normalization Help Optimization? (NeurIPS): "
             "Fig. 2 (noisy BN), Definition 2.1 and Fig. 5 (ICS), Fig. 4 (landscape)")
    our_choices = ("steps", "eval_every", "lr", "batch_size", "channels", "step_grid", "noise_mean", "noise_std",
                   "test_images")
    order = 40

    def arms(self, cfg):
        return ARMS

    def label(self, arm):
        base, _, seed = arm.partition("/")
        return LABELS[base] + (f" {seed}" if seed else "")

    def build_arm(self, arm, cfg, ds, device):
        data = device_data(ds, device, image=True)
        order = mnist_data.DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
        return TorchArm(arm, network(arm, cfg), data, order, cfg.seed, device, lr=cfg.lr, measure=Measure(cfg))

    def summarize(self, cfg, records):
        return summarize(records, cfg)

    def table(self, summary, meta):
        return format_table(summary)

    def plot(self, records, meta):
        return plot_figure(records, meta)


# ---------------------------------------------------------------------------------------------------------------
# summary


def ics_layers(record: dict, key: str) -> list[int]:
    """The layer numbers with an ICS entry in ``record[key]``."""
    return sorted(int(k.rsplit("_", 1)[1]) for k in record[key] if k.startswith("ics_l2_"))


def _over_training(records: list[dict], key: str, metric: str) -> float | None:
    """Mean of ``metric`` (a name, or ``ics_l2``/``ics_cos``: the mean over layers) over the evaluations after
    step 0."""
    vals = []
    for r in records[1:]:
        m = r[key]
        if metric in ("ics_l2", "ics_cos"):
            layer = [m[f"{metric}_{i}"] for i in ics_layers(r, key)]
            v = None if any(x is None for x in layer) else float(np.mean(layer))
        else:
            v = m[metric]
        if v is None or not math.isfinite(v):
            return None
        vals.append(v)
    return float(np.mean(vals)) if vals else None


SUMMARY_METRICS = (*LANDSCAPE, "ics_l2", "ics_cos")
WHEN = ("first", "mid", "final")  # the evaluations whose accuracies are compared: first after step 0, middle, last


def summarize(records: list[dict], cfg: LandscapeConfig) -> dict:
    """Per arm, over the seeds: each landscape measure and the ICS (mean over layers, and per layer) averaged over
    the evaluations after step 0, and the test accuracy at the first evaluation after step 0, the middle one and
    the last; per measure, the paired ratio BN / standard and noisy BN / standard (per seed), and the paired
    accuracy differences."""
    seeds, last = seed_list(cfg), records[-1]
    when = {"first": records[1 if len(records) > 1 else 0], "mid": records[len(records) // 2], "final": last}

    def per_seed(arm, fn):
        return [fn(unit_key(arm, s, cfg)) for s in seeds]

    out = {**{f"{w}_step": rec["step"] for w, rec in when.items()}, "seeds": seeds, "lr": cfg.lr,
           "step_grid": list(cfg.step_grid), "layers": ics_layers(last, unit_key("bn", seeds[0], cfg)),
           "arms": {}, "ratios": {}, "acc_diff": {}}
    values = {a: {m: per_seed(a, lambda k, m=m: _over_training(records, k, m)) for m in SUMMARY_METRICS}
              for a in ARMS}
    for a in ARMS:
        out["arms"][a] = {m: mean_std(values[a][m]) for m in SUMMARY_METRICS}
        for w, rec in when.items():
            out["arms"][a][f"acc_{w}"] = mean_std(per_seed(a, lambda k, rec=rec: rec[k]["test_acc"]))
    out["ics_layers"] = {a: {str(i): {m: mean_std(per_seed(a, lambda k, name=f"ics_{m}_{i}": _over_training(
        records, k, name))) for m in ("l2", "cos")} for i in out["layers"]} for a in ARMS}
    for a in ("bn", "noisy_bn"):
        out["ratios"][a] = {m: mean_std([None if x is None or y is None or y == 0 else x / y
                                         for x, y in zip(values[a][m], values["standard"][m])])
                            for m in SUMMARY_METRICS}
    for a, b in (("bn", "standard"), ("noisy_bn", "standard"), ("noisy_bn", "bn")):
        out["acc_diff"][f"{a}-{b}"] = {
            w: mean_std([x - y for x, y in zip(per_seed(a, lambda k, rec=rec: rec[k]["test_acc"]),
                                                  per_seed(b, lambda k, rec=rec: rec[k]["test_acc"]))])
            for w, rec in when.items()}
    out["claims"] = claims(out)
    return out


def _clear(m_s: tuple, n: int, against: float) -> int:
    """+1 / -1 when the mean of a paired quantity is above / below ``against`` beyond 2 std/√n; 0 within."""
    mean, std = m_s
    if mean is None or n < 2 or abs(mean - against) <= 2 * std / math.sqrt(n):
        return 0
    return 1 if mean > against else -1


# (claim, what we compare, the paper's direction). Ratios are BN / standard, per seed.
CLAIMS = (
    ("BN makes the loss change less along the gradient (Fig. 4a)", "loss_range", -1),
    ("BN makes the gradient more predictive: it changes less along the gradient (Fig. 4b)", "grad_range", -1),
    ("BN lowers the effective β-smoothness (Fig. 4c)", "beta", -1),
    ("BN does not reduce ICS (ℓ2 of Def. 2.1); it is often larger (Fig. 5)", "ics_l2", 1),
    ("... nor makes G and G' better aligned (cosine of Def. 2.1; Fig. 5)", "ics_cos", -1),
)


def claims(summary: dict) -> list[dict]:
    """Each published claim with our numbers and whether we agree: for the landscape, the BN / standard ratio must
    be clearly below 1 (above for ℓ2 ICS; for the ICS claims "not smaller" also holds within noise); noisy BN
    "trains about as fast as BN": its accuracy is closer to BN's than to the standard network's at the first
    evaluation after step 0, the middle and the last one."""
    n = len(summary["seeds"])
    out = []
    for text, metric, sign in CLAIMS:
        ratio = summary["ratios"]["bn"][metric]
        side = _clear(ratio, n, 1.0)
        if metric.startswith("ics"):  # "not smaller" / "not better aligned": only a clear opposite disagrees
            verdict = "?" if n < 2 or ratio[0] is None else {
                sign: "agrees", 0: "agrees (within noise: not clearly either way)", -sign: "disagrees"}[side]
        else:
            verdict = "?" if n < 2 or ratio[0] is None else (
                "agrees" if side == sign else "disagrees" if side == -sign else "within noise")
        out.append({"claim": text, "metric": metric, "ratio": ratio, "verdict": verdict})
    d = summary["acc_diff"]
    close = all(abs(d["noisy_bn-bn"][w][0]) < abs(d["noisy_bn-standard"][w][0]) for w in WHEN)
    out.append({"claim": "noisy BN trains about as fast as BN, despite its moving input distributions (Fig. 2)",
                "metric": "test_acc", "ratio": None, "verdict": "agrees" if close else "disagrees"})
    return out


# ---------------------------------------------------------------------------------------------------------------
# table


def _ms(m_s, fmt: str = "{:.3g}") -> str:
    mean, std = m_s
    if mean is None:
        return "-"
    return fmt.format(mean) + (f" ± {fmt.replace('+', '').format(std)}" if std else "")


NOTES = """\
Mean ± std over {n} seed(s). Landscape and ICS columns: each network's measure averaged over its evaluations
after step 0 (every {every} steps up to {final:,}), on the mini-batch it trains on next, in train mode; step
sizes η = lr·k, lr = {lr}, k in {grid}. *ICS*: ‖G − G'‖ and cos(G, G') of Definition 2.1, per conv/linear
layer {layers} and their mean. Test accuracy on the test set in eval mode (noisy BN: without its noise). The
ratios are paired (same seed, same batches): the measure of the BN (noisy BN) network over that of the standard
one, per seed.

The paper gives plots, not numbers (VGG on CIFAR-10 and a 25-layer deep linear network; ours: a {depth}-conv
CNN on MNIST, {final:,} steps): each claim is compared by direction. "within noise": the ratio is not clearly
(2·std/√seeds) on either side of 1.
"""


def format_table(summary: dict) -> str:
    """The run's Markdown: per arm the measures and accuracies, then each published claim beside our numbers."""
    rows = []
    for a in ARMS:
        info = summary["arms"][a]
        rows.append((LABELS[a], *(_ms(info[m]) for m in SUMMARY_METRICS),
                     *(_ms(info[f"acc_{w}"], "{:.4f}") for w in WHEN)))
    header = ("network", "loss variation", "grad. predictiveness (ℓ2 range)", "effective β", "ICS ℓ2", "ICS cos",
              *(f"test acc @ {summary[w + '_step']:,}" for w in WHEN))
    claim_rows = []
    for c in summary["claims"]:
        if c["ratio"] is None:
            d = summary["acc_diff"]
            ours_text = ("; ".join(f"@ {summary[w + '_step']:,}: noisy − BN {_ms(d['noisy_bn-bn'][w], '{:+.4f}')}, "
                                   f"noisy − standard {_ms(d['noisy_bn-standard'][w], '{:+.4f}')}"
                                   for w in WHEN))
        else:
            noisy = summary["ratios"]["noisy_bn"][c["metric"]]
            ours_text = f"BN/standard {_ms(c['ratio'], '{:.3g}')} (noisy BN/standard {_ms(noisy, '{:.3g}')})"
        claim_rows.append((c["claim"], ours_text, c["verdict"]))
    layer_rows = [(LABELS[a], *(f"{_ms(summary['ics_layers'][a][str(i)]['l2'])} / "
                                f"{_ms(summary['ics_layers'][a][str(i)]['cos'], '{:.3f}')}" for i in summary["layers"]))
                  for a in ARMS]
    layer_header = ("ICS per layer: ‖G − G'‖ / cos", *(f"layer {i}" for i in summary["layers"]))
    depth = len(summary["layers"])
    grid = "(" + ", ".join(f"{k:g}" for k in summary["step_grid"]) + ")"
    cfg = summary.get("config", {})
    return "\n".join([
        markdown_table(header, rows), "",
        markdown_table(layer_header, layer_rows), "",
        markdown_table(("published claim (Santurkar et al. 2018)", "ours", "agrees?"), claim_rows), "",
        NOTES.format(n=len(summary["seeds"]), every=cfg.get("eval_every", "?"), final=summary["final_step"],
                     lr=summary["lr"], grid=grid, layers=", ".join(map(str, summary["layers"])), depth=depth),
    ]).rstrip()


# ---------------------------------------------------------------------------------------------------------------
# the figure


def _band(records: list[dict], arm: str, cfg: LandscapeConfig, fn, log: bool) -> tuple[np.ndarray, ...]:
    """Per record, the mean over the seeds of ``fn(record, key)`` and a band of ± one std; on a log axis both in
    log space (geometric mean, times / divided by the geometric std), so that the band stays positive."""
    vals = np.array([[fn(r, unit_key(arm, s, cfg)) for s in seed_list(cfg)] for r in records], dtype=np.float64)
    if log:
        vals = np.log(vals)
    mean = vals.mean(axis=1)
    std = vals.std(axis=1, ddof=1) if vals.shape[1] > 1 else np.zeros(len(vals))
    lo, hi = mean - std, mean + std
    return (np.exp(mean), np.exp(lo), np.exp(hi)) if log else (mean, lo, hi)


def plot_figure(records: list[dict], meta: dict):
    """As the paper's Fig. 4, over training for the three networks (mean ± std over the seeds; on the log axes of
    the log): loss variation, gradient predictiveness, effective β-smoothness; then the ICS ℓ2 and cosine (mean
    over layers) and test accuracy."""
    from normlab.lab.plots import pyplot, run_note

    plt = pyplot()
    cfg = LandscapeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    steps = [r["step"] for r in records]
    layers = ics_layers(records[-1], unit_key("bn", cfg.seed, cfg))

    def ics_mean(metric):
        return lambda r, k: float(np.mean([r[k][f"{metric}_{i}"] for i in layers]))

    which = ", ".join(map(str, layers))
    panels = [("(a) loss variation: range of L(θ − ηg)", lambda r, k: r[k]["loss_range"], True),
              ("(b) gradient predictiveness: range of ‖∇L(θ) − ∇L(θ − ηg)‖", lambda r, k: r[k]["grad_range"], True),
              ("(c) effective β-smoothness: max ‖∇L(θ) − ∇L(θ − ηg)‖ / ‖ηg‖", lambda r, k: r[k]["beta"], True),
              (f"(d) ICS ‖G − G'‖ (Def. 2.1), mean of layers {which}", ics_mean("ics_l2"), True),
              (f"(e) ICS cos(G, G'), mean of layers {which}", ics_mean("ics_cos"), False),
              ("(f) test accuracy", lambda r, k: r[k]["test_acc"], False)]
    fig, axes = plt.subplots(2, 3, figsize=(13.5, 7.2))
    axes = axes.flatten()
    for ax, (title, fn, log) in zip(axes, panels):
        for a in ARMS:
            mean, lo, hi = _band(records, a, cfg, fn, log)
            ax.plot(steps, mean, color=COLORS[a], label=LABELS[a])
            ax.fill_between(steps, lo, hi, color=COLORS[a], alpha=0.2, linewidth=0)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(steps[0], steps[-1])
        ax.grid(alpha=0.3)
    for ax in axes[3:]:
        ax.set_xlabel("training steps")
    axes[-1].set_ylim(max(0.0, axes[-1].get_ylim()[0]), 1.0)
    axes[-1].legend(loc="lower right", fontsize=8)
    grid = ", ".join(f"{k:g}" for k in cfg.step_grid)
    note = (f"small CNN {tuple(cfg.channels)} on MNIST, SGD lr={cfg.lr}, batch {cfg.batch_size}; η = lr·k, "
            f"k ∈ {{{grid}}}; {cfg.seeds} seed(s) from {cfg.seed}: mean ± std (log axes: of the log)")
    extra = run_note(meta)
    fig.suptitle("Why BN helps (Santurkar et al. 2018, Fig. 4): " + note + (f"\n{extra}" if extra else ""),
                 fontsize=9)
    fig.tight_layout()
    return fig
