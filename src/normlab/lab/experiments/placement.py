"""``normlab placement``: batch norm before or after the non-linearity? (issue 9, section 2)

For each model (the paper's MNIST MLP 784-100-100-100-10 and the factory's small CNN) and each activation
(sigmoid, tanh, ReLU), five networks are trained side by side on the same mini-batches, from the same initial
weight matrices (a pure function of the seed and the layer's index):

- ``none``: no normalization (each linear/conv layer has a bias);
- ``before`` / ``before_affine``: ``layer -> BN -> activation``, the paper's placement, without / with BN's
  learnable scale and shift (γ, β; without them the layer has no shift at all: a bias before BN would be removed
  with the mean);
- ``after`` / ``after_affine``: ``layer -> activation -> BN``, without / with γ, β.

"Without scale and shift" is what the published CaffeNet runs call plain BN (Caffe's BatchNorm layer); "with" adds
their scale&bias layer. An arm is named ``<model>-<activation>-<variant>``, e.g. ``mlp-relu-after_affine``.

Every ``eval_every`` steps each network is evaluated on the whole test set (eval mode: BN uses its running
statistics), and on the first :data:`SKEW_IMAGES` test images two skewnesses are taken, per hidden unit / channel
(:func:`normlab.diagnostics.channel_skewness`), then the median over all hidden layers' units: ``skew_bn``, of what
BN normalizes (the skewness of the normalized values x̂, which a per-channel scale and shift leave unchanged) and
``skew_next``, of each block's output (what the next layer receives, before the CNN's pooling). The median, not
the mean: a nearly dead ReLU unit has a skewness of order √N and would swamp a mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab.diagnostics import NORM_TYPES, channel_skewness, normalized_input
from normlab.lab import data as mnist_data
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data, mean_std, ours, seed_list, unit_key
from normlab.lab.metrics import markdown_table, steps_to_reach, value_at
from normlab.lab.models import ACTIVATION_MODULES, SIZES, make_cnn, make_mlp
from normlab.lab.registry import register

MODELS = ("mlp", "cnn")
MODEL_CHOICES = (*MODELS, "both")
VARIANTS = ("none", "before", "before_affine", "after", "after_affine")
VARIANT_LABELS = {"none": "no BN", "before": "BN before", "before_affine": "BN before + γ,β",
                  "after": "BN after", "after_affine": "BN after + γ,β"}
ACTIVATION_LABELS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "ReLU"}
MODEL_LABELS = {"mlp": "MLP 784-100-100-100-10", "cnn": "small CNN"}
# ducha-aiki/caffenet-benchmark: CaffeNet on ImageNet at 128 px, ReLU, top-1 accuracy. BN rows from batchnorm.md
# ("BN -- before or after ReLU?"); no BN is the benchmark's ReLU baseline (README.md; 0.471 in batchnorm.md's
# BN-arch-init table).
CAFFENET = {"none": 0.470, "before": 0.474, "before_affine": 0.478, "after": 0.499, "after_affine": 0.493}
# The paired differences the published numbers speak to: (name, a, b, published a - b)
COMPARISONS = tuple((f"{VARIANT_LABELS[a]} − {VARIANT_LABELS[b]}", a, b, round(CAFFENET[a] - CAFFENET[b], 3))
                    for a, b in (("after", "before"), ("after_affine", "before_affine"), ("before", "none"),
                                 ("before_affine", "none"), ("after", "none"), ("after_affine", "none"),
                                 ("before_affine", "before"), ("after_affine", "after")))
EVAL_CHUNK = 2000  # test images per forward pass (bounds the CNN's memory)
SKEW_IMAGES = 500  # the skewnesses' images, the first of the test set: 500 values per MLP unit, >= 98,000 per CNN
# channel (more cost more than the CNN's evaluation itself)


@dataclass
class PlacementConfig(RunConfig):
    """Everything that decides a placement run's numbers. Sizes are CPU-sized: minutes on two cores."""

    steps: int = field(default=400, metadata={"help": "training steps (every network)"})
    eval_every: int = field(default=100, metadata={"help": "steps between evaluations (the resolution of "
                                                           "'steps to target')"})
    seeds: int = field(default=3, metadata={"help": "how many seeds, from --seed on: several give mean ± std"})
    model: str = field(default="both", metadata={"help": "which networks: the MLP, the small CNN, or both",
                                                  "choices": MODEL_CHOICES})
    activations: tuple[str, ...] = field(default=("sigmoid", "tanh", "relu"), metadata={
        "help": "the non-linearities", "choices": tuple(ACTIVATION_MODULES)})
    lr: float = field(default=0.1, metadata=ours("SGD learning rate, the same for every network"))
    target: float = field(default=0.93, metadata=ours("the test accuracy of 'steps to target'"))
    acc_steps: tuple[int, ...] = field(default=(100, 200), metadata=ours(
        "steps at which test accuracy is reported besides the last (multiples of eval_every)"))
    cnn_channels: tuple[int, ...] = field(default=(4, 8), metadata=ours(
        "the CNN's conv widths, one 3x3 conv block and a 2x2 max-pool each"))

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [
            ("model", self.model in MODEL_CHOICES, f"must be one of {MODEL_CHOICES}"),
            ("activations", len(self.activations) >= 1 and len(set(self.activations)) == len(self.activations)
             and set(self.activations) <= set(ACTIVATION_MODULES),
             f"must be distinct names among {tuple(ACTIVATION_MODULES)}"),
            ("lr", self.lr > 0, "must be > 0"),
            ("target", 0 < self.target < 1, "must be in (0, 1)"),
            ("acc_steps", all(s >= 1 and s % self.eval_every == 0 for s in self.acc_steps),
             f"must be positive multiples of eval_every={self.eval_every}"),
            ("cnn_channels", len(self.cnn_channels) >= 1 and all(c >= 1 for c in self.cnn_channels),
             "must be one or more widths >= 1"),
        ]


def models_of(cfg: PlacementConfig) -> tuple[str, ...]:
    """The models a run trains, in order."""
    return MODELS if cfg.model == "both" else (cfg.model,)


def arm_name(model: str, activation: str, variant: str) -> str:
    return f"{model}-{activation}-{variant}"


def parse_arm(arm: str) -> tuple[str, str, str]:
    """``"mlp-relu-after_affine"`` (or its ``/s<seed>`` key) -> ``("mlp", "relu", "after_affine")``."""
    model, activation, variant = arm.partition("/")[0].split("-")
    return model, activation, variant


def network(arm: str, cfg: PlacementConfig) -> torch.nn.Sequential:
    """The ``arm`` network at its initial state. Its weight matrices are drawn from ``(seed, layer index)`` as
    torch's default init would draw them, so the five variants of a model start from the same weights (biases,
    where a variant has them, likewise)."""
    model, activation, variant = parse_arm(arm)
    norm = "none" if variant == "none" else "batch"
    kw = {"norm": norm, "placement": variant.partition("_")[0] if norm == "batch" else "before",
          "activation": activation, "affine": variant.endswith("_affine")}
    net = make_mlp(SIZES, **kw) if model == "mlp" else make_cnn(cfg.cnn_channels, **kw)
    layers = [m for m in net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 2, i]).generate_state(1)[0]))
            torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=g)  # torch's default
            if layer.bias is not None:
                bound = 1 / math.sqrt(layer.weight[0].numel())
                torch.nn.init.uniform_(layer.bias, -bound, bound, generator=g)
    if model == "cnn":
        # channels_last: torch's CPU max-pool is several times faster on it (the numbers do not depend on it)
        net = net.to(memory_format=torch.channels_last)
    return net


def _median(skews: list[torch.Tensor]) -> float | None:
    v = torch.cat(skews) if skews else torch.empty(0)
    v = v[~v.isnan()]
    return float(v.median()) if len(v) else None


class _Measure:
    """Test loss and accuracy over the whole test set, in chunks, and the median skewnesses of what each BN layer
    normalizes (``skew_bn``; None without BN) and of each block's output (``skew_next``) on the first
    :data:`SKEW_IMAGES` test images (in eval mode each image's values depend on it alone, so slicing is exact)."""

    def __init__(self, net: torch.nn.Sequential):
        self.ends = {i for i, m in enumerate(net)  # a block's last module: the (fused) norm, or the activation
                     if isinstance(m, (*NORM_TYPES, *{type(f()) for f in ACTIVATION_MODULES.values()}))}

    def __call__(self, arm: TorchArm) -> dict:
        loss, correct, bn, nxt = 0.0, 0, [], []
        for c, (x, y) in enumerate(zip(arm.data.test_x.split(EVAL_CHUNK), arm.data.test_y.split(EVAL_CHUNK))):
            for i, m in enumerate(arm.net):
                out = m(x)
                if c == 0 and i in self.ends:
                    if isinstance(m, NORM_TYPES):
                        bn.append(channel_skewness(normalized_input(m, x[:SKEW_IMAGES])))
                    nxt.append(channel_skewness(out[:SKEW_IMAGES]))
                x = out
            loss += torch.nn.functional.cross_entropy(x, y, reduction="sum").item()
            correct += int((x.argmax(dim=1) == y).sum())
        n = len(arm.data.test_y)
        return {"test_loss": loss / n, "test_acc": correct / n, "skew_bn": _median(bn), "skew_next": _median(nxt)}


@register
class Placement(Experiment):
    name = "placement"
    title = "batch norm before or after the non-linearity? (MLP and small CNN; sigmoid, tanh, ReLU)"
    config = PlacementConfig
    # one seed, 100 steps, sigmoid and ReLU only (the CNN's evaluations on the test set are most of its cost)
    quick = {"steps": 100, "eval_every": 50, "seeds": 1, "activations": ("sigmoid", "relu"), "acc_steps": (50,),
             "target": 0.85}
    figure_name = "placement.png"
    paper = ("Ioffe & Szegedy 2015, section 3.2 (BN before the non-linearity); published CaffeNet128 placement "
             "runs: ducha-aiki/caffenet-benchmark, batchnorm.md")
    our_choices = ("lr", "batch_size", "steps", "eval_every", "cnn_channels", "target", "acc_steps")
    resumable_changes = ("steps", "data_dir", "workers", "target", "acc_steps")
    order = 10

    def arms(self, cfg):
        return tuple(arm_name(m, a, v) for m in models_of(cfg) for a in cfg.activations for v in VARIANTS)

    def label(self, arm):
        model, activation, variant = parse_arm(arm)
        seed = arm.partition("/")[2]
        return f"{model} {ACTIVATION_LABELS.get(activation, activation)} {VARIANT_LABELS[variant]}" + (
            f" {seed}" if seed else "")

    def build_arm(self, arm, cfg, ds, device):
        net = network(arm, cfg)
        data = device_data(ds, device, image=parse_arm(arm)[0] == "cnn")
        order = mnist_data.DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
        return TorchArm(arm, net, data, order, cfg.seed, device, lr=cfg.lr, measure=_Measure(net))

    def summarize(self, cfg, records):
        return summarize(records, cfg)

    def table(self, summary, meta):
        return format_table(summary)

    def plot(self, records, meta):
        return plot_curves(records, meta)


# ---------------------------------------------------------------------------------------------------------------
# summary


def summarize(records: list[dict], cfg: PlacementConfig) -> dict:
    """Per arm, over the seeds: test accuracy at ``acc_steps`` and at the last step, steps to ``target``, the
    skewnesses at the last step; per model and activation, the paired differences of the published comparisons
    (mean and std over seeds of ``acc(a) - acc(b)`` at the last step) and the variants ranked by final accuracy."""
    seeds = seed_list(cfg)
    last = records[-1]
    arms = Placement().arms(cfg)

    def per_seed(arm, fn):
        return [fn(unit_key(arm, s, cfg)) for s in seeds]

    out = {"final_step": last["step"], "seeds": seeds, "models": list(models_of(cfg)),
           "activations": list(cfg.activations), "target": cfg.target, "acc_steps": list(cfg.acc_steps),
           "arms": {}, "comparisons": {}, "ranking": {}}
    for arm in arms:
        reach = per_seed(arm, lambda k: steps_to_reach(records, k, cfg.target))
        done = [r for r in reach if r is not None]
        out["arms"][arm] = {
            "final": mean_std(per_seed(arm, lambda k: last[k]["test_acc"])),
            "acc_at": {str(s): mean_std(per_seed(arm, lambda k, s=s: value_at(records, s, k))) for s in cfg.acc_steps},
            "steps_to_target": float(np.mean(done)) if len(done) == len(seeds) else None,
            "reached": len(done),
            "skew_bn": mean_std(per_seed(arm, lambda k: last[k]["skew_bn"])),
            "skew_next": mean_std(per_seed(arm, lambda k: last[k]["skew_next"])),
        }
    for model in models_of(cfg):
        for act in cfg.activations:
            group = f"{model}-{act}"
            finals = {v: per_seed(arm_name(model, act, v), lambda k: last[k]["test_acc"]) for v in VARIANTS}
            out["comparisons"][group] = {
                f"{a}-{b}": mean_std([x - y for x, y in zip(finals[a], finals[b])]) for _, a, b, _ in COMPARISONS}
            out["ranking"][group] = sorted(VARIANTS, key=lambda v: -np.mean(finals[v]))
    return out


def verdict(diff: tuple[float | None, float | None], n: int) -> str:
    """``"+"`` or ``"−"``: the sign of a paired difference clear of the seeds' noise (|mean| > 2 std / √n);
    ``"≈"`` within it; ``"?"`` with one seed (no noise estimate)."""
    mean, std = diff
    if mean is None:
        return "?"
    if n < 2:
        return "?"
    if abs(mean) <= 2 * std / math.sqrt(n):
        return "≈"
    return "+" if mean > 0 else "−"


def agreement(summary: dict, model: str, activation: str = "relu") -> str:
    """One sentence per published claim: does our ``model``/``activation`` run order the variants as CaffeNet?"""
    group = f"{model}-{activation}"
    comp, n = summary["comparisons"][group], len(summary["seeds"])
    pub = " > ".join(VARIANT_LABELS[v] for v in sorted(VARIANTS, key=lambda v: -CAFFENET[v]))
    ours = " > ".join(VARIANT_LABELS[v] for v in summary["ranking"][group])
    lines = [f"- **{model.upper()}, {ACTIVATION_LABELS.get(activation, activation)}**: ours {ours} "
             f"(CaffeNet: {pub})."]
    for label, a, b, published in COMPARISONS:
        if (a, b) not in (("after", "before"), ("after_affine", "before_affine"), ("before", "none"),
                          ("before_affine", "none")):
            continue
        mean, std = comp[f"{a}-{b}"]
        v = verdict((mean, std), n)
        said = {"+": "agrees" if published > 0 else "disagrees", "−": "disagrees" if published > 0 else "agrees",
                "≈": "within our seed noise", "?": "one seed: no verdict"}[v]
        lines.append(f"  {label}: ours {mean:+.4f} ± {std:.4f}, CaffeNet {published:+.3f}: {said}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# table


def _ms(m_s, digits: int = 4, signed: bool = False) -> str:
    mean, std = m_s
    if mean is None:
        return "-"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f.format(mean) + (f" ± {std:.{digits}f}" if std else "")


def _steps(info: dict, summary: dict) -> str:
    n = len(summary["seeds"])
    if info["steps_to_target"] is not None:
        return f"{info['steps_to_target']:,.0f}"
    reached = f" ({info['reached']}/{n} seeds)" if n > 1 and info["reached"] else ""
    return f"> {summary['final_step']:,}{reached}"


NOTES = """\
Accuracies are on the 10,000 MNIST test images, as mean ± std over {n} seed(s); steps to {target:.0%} is the first
evaluation (every {every} steps) at or above it, averaged over the seeds (> last step when a seed never got there).
*skew x̂*: median over the hidden units/channels of the skewness of what BN normalizes (= that of the normalized
values x̂); *skew next*: of what each block passes to the next layer; both on the first {chunk:,} test images at the
last step. ReLU's output is right-skewed (a rectified Gaussian has skewness 1.64): BN after ReLU normalizes that
skewed distribution, BN before ReLU a roughly symmetric one.

*CaffeNet*: top-1 accuracy of CaffeNet on ImageNet at 128 px with ReLU (ducha-aiki/caffenet-benchmark,
batchnorm.md; "no BN" is the benchmark's ReLU baseline in its README.md), one run each, trained to convergence.
Their numbers say: BN after ReLU beats BN before it by 0.015-0.025, BN before ReLU gains little over no BN
(+0.004/+0.008), and the scale&bias layer changes little (+0.004 before, −0.006 after). MNIST is not ImageNet and
our runs are {steps:,} steps, not convergence: the comparison is of orderings, not of values. Does ours agree
(paired differences of final test accuracy, same seeds and batches; "within our seed noise" when
|mean| ≤ 2·std/√seeds)?
"""


def format_table(summary: dict) -> str:
    """The run's Markdown: per model a table of every variant (ours beside CaffeNet's for ReLU), the paired
    differences against the published ones, and the notes that say whether our ordering agrees."""
    final = summary["final_step"]
    acc_steps = [s for s in summary["acc_steps"] if s < final]
    parts = []
    for model in summary["models"]:
        rows = []
        for act in summary["activations"]:
            for v in VARIANTS:
                info = summary["arms"][arm_name(model, act, v)]
                rows.append((f"{ACTIVATION_LABELS.get(act, act)}, {VARIANT_LABELS[v]}",
                             *(_ms(info["acc_at"][str(s)]) for s in acc_steps), _ms(info["final"]),
                             _steps(info, summary), _ms(info["skew_bn"], 2), _ms(info["skew_next"], 2),
                             f"{CAFFENET[v]:.3f}" if act == "relu" else ""))
        header = ("", *(f"acc @ {s:,}" for s in acc_steps), f"acc @ {final:,} (last)",
                  f"steps to {summary['target']:.0%}", "skew x̂", "skew next", "CaffeNet top-1")
        parts += [f"### {MODEL_LABELS[model]}", "", markdown_table(header, rows), ""]
    groups = [(m, a) for m in summary["models"] for a in summary["activations"]]
    rows = [(label, f"{published:+.3f}",
             *(_ms(summary["comparisons"][f"{m}-{a}"][f"{x}-{y}"], 4, signed=True) for m, a in groups))
            for label, x, y, published in COMPARISONS]
    header = ("paired difference of final acc", "CaffeNet (ReLU)",
              *(f"{m} {ACTIVATION_LABELS.get(a, a)}" for m, a in groups))
    parts += ["### Differences between variants", "", markdown_table(header, rows), ""]
    cfg = summary.get("config", {})
    parts.append(NOTES.format(n=len(summary["seeds"]), target=summary["target"], every=cfg.get("eval_every", "?"),
                              chunk=SKEW_IMAGES, steps=final))
    if "relu" in summary["activations"]:
        parts += [agreement(summary, m) for m in summary["models"]]
    return "\n".join(parts).rstrip()


# ---------------------------------------------------------------------------------------------------------------
# the figure

STYLE = {"none": ("tab:gray", "-"), "before": ("tab:blue", "--"), "before_affine": ("tab:blue", "-"),
         "after": ("tab:orange", "--"), "after_affine": ("tab:orange", "-")}


def plot_curves(records: list[dict], meta: dict):
    """Learning curves: one panel per model (rows) and activation (columns), test accuracy against steps for the
    five variants, mean over the seeds with a ±std band. Returns the matplotlib Figure."""
    from normlab.lab.plots import pyplot, run_note

    plt = pyplot()
    cfg = PlacementConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    models, acts = models_of(cfg), cfg.activations
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(len(models), len(acts), figsize=(4.2 * len(acts), 3.4 * len(models)), squeeze=False,
                             sharex=True)
    for row, model in zip(axes, models):
        for ax, act in zip(row, acts):
            finals = []
            for v in VARIANTS:
                acc = np.array([[r[unit_key(arm_name(model, act, v), s, cfg)]["test_acc"] for s in seed_list(cfg)]
                                for r in records])
                mean, std = acc.mean(axis=1), acc.std(axis=1, ddof=1) if acc.shape[1] > 1 else np.zeros(len(acc))
                color, ls = STYLE[v]
                ax.plot(steps, mean, ls, color=color, label=VARIANT_LABELS[v])
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
                finals.append(mean[-1])
            ax.axhline(cfg.target, color="k", lw=0.6, ls=":")
            # the interesting part is near the top: from a little below the worst final accuracy
            ax.set_ylim(max(0.0, math.floor((min(finals) - 0.05) * 20) / 20), 1.0)
            ax.set_xlim(steps[0], steps[-1])
            ax.set_title(f"{MODEL_LABELS[model]}, {ACTIVATION_LABELS.get(act, act)}", fontsize=10)
            ax.grid(alpha=0.3)
            if ax is row[0]:
                ax.set_ylabel("test accuracy")
            if model == models[-1]:
                ax.set_xlabel("training steps")
    axes[0][0].legend(loc="lower right", fontsize=8)
    note = (f"SGD lr={cfg.lr}, batch {cfg.batch_size}, {cfg.seeds} seed(s) from {cfg.seed} (mean ± std); dotted: "
            f"target {cfg.target:.0%}")
    extra = run_note(meta)
    fig.suptitle(f"BN placement on MNIST: test accuracy. {note}" + (f"\n{extra}" if extra else ""), fontsize=9)
    fig.tight_layout()
    return fig
