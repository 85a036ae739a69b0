"""``normlab regularization``: does batch norm replace dropout? (Ioffe & Szegedy 2015, §3.4 and §4.2.1)

On a reduced MNIST training set (``train_size`` images, one seeded subset shared by every arm and seed), the MNIST
MLP of the model factory (784-100-100-100-10, ReLU) is trained six ways side by side, on the same mini-batches
and from the same initial weights: ``plain``; ``drop0.5`` and ``drop0.2`` (dropout); ``bn``; ``bn+drop0.2``
and ``bn+drop0.5``. The factory puts dropout after each hidden block's activation (``Linear -> [BN ->] ReLU ->
Dropout``), never on the input or the logits; BN sits before the ReLU (``placement``, the paper's choice).

At each evaluation, in eval mode: test accuracy and loss over the 10,000 test images, train accuracy over the
reduced training set, and the generalization gap (train minus test accuracy). At step 0 and at the last step the
BN arms also measure the noise BN injects (:func:`normlab.diagnostics.batch_noise`): for one fixed training
example, the std over random mini-batches of its batch-normalized value at the first BN layer, per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from normlab.diagnostics import batch_noise, norm_layers, normalized_input
from normlab.lab.data import DataOrder
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data, eval_metrics, mean_std, seed_list
from normlab.lab.experiment import unit_key as _key
from normlab.lab.metrics import markdown_table
from normlab.lab.models import SIZES, load_weights, make_mlp
from normlab.lab.registry import register
from normlab.spec import ACTIVATIONS, PLACEMENTS

# CaffeNet128 on ImageNet, BN after ReLU, dropout on fc6/fc7 only: top-1 (ducha-aiki/caffenet-benchmark,
# batchnorm.md, "BN and dropout"). The no-BN CaffeNet128 (its standard fc dropout 0.5) is in the same file.
PAPER = {"bn": 0.513, "bn+drop0.2": 0.527, "bn+drop0.5": 0.499, "drop0.5": 0.471}
SOURCE = "ducha-aiki/caffenet-benchmark, batchnorm.md"


@dataclass
class RegularizationConfig(RunConfig):
    """Everything that decides a run's numbers. The optimizer, rate, sizes and the subset are normlab's choices."""

    steps: int = field(default=3_000, metadata={"help": "training steps"})
    eval_every: int = field(default=250, metadata={"help": "steps between evaluations"})
    seeds: int = field(default=3, metadata={"help": "how many seeds, from --seed on: several give mean ± std"})
    lr: float = field(default=0.1, metadata={"help": "SGD learning rate (plain SGD, no momentum, no weight decay)"})
    train_size: int = field(default=5_000, metadata={
        "help": "training images: a seeded random subset of the training set, the same for every arm and seed"})
    subset_seed: int = field(default=0, metadata={"help": "seed of the training subset (independent of --seed)"})
    dropouts: tuple[float, ...] = field(default=(0.5, 0.2), metadata={
        "help": "dropout rates: one arm each without and one with BN"})
    activation: str = field(default="relu", metadata={"help": "hidden activation", "choices": ACTIVATIONS})
    placement: str = field(default="before", metadata={"help": "BN before (the paper) or after the activation",
                                                       "choices": PLACEMENTS})
    noise_batch_sizes: tuple[int, ...] = field(default=(2, 4, 8, 16, 32, 64, 128), metadata={
        "help": "batch sizes of the BN-noise measure"})
    noise_draws: int = field(default=256, metadata={"help": "random mini-batches per batch size of the noise measure"})
    noise_example: int = field(default=0, metadata={
        "help": "the fixed example of the noise measure (its index in the reduced training set)"})

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [
            ("lr", self.lr > 0, "must be > 0"),
            ("train_size", self.train_size >= 2, "must be >= 2"),
            ("train_size", self.batch_size <= self.train_size, "must be >= batch_size"),
            ("dropouts", bool(self.dropouts) and all(0 < p < 1 for p in self.dropouts)
             and len(set(self.dropouts)) == len(self.dropouts), "must be distinct rates in (0, 1)"),
            ("activation", self.activation in ACTIVATIONS, f"must be one of {ACTIVATIONS}"),
            ("placement", self.placement in PLACEMENTS, f"must be one of {PLACEMENTS}"),
            ("noise_batch_sizes", bool(self.noise_batch_sizes) and all(
                2 <= m <= self.train_size for m in self.noise_batch_sizes), "must be in [2, train_size]"),
            ("noise_draws", self.noise_draws >= 2, "must be >= 2"),
            ("noise_example", 0 <= self.noise_example < self.train_size, "must be in [0, train_size)"),
        ]


def arm_names(cfg: RegularizationConfig) -> tuple[str, ...]:
    """``plain``, ``drop<p>`` per rate, ``bn``, ``bn+drop<p>`` per rate in increasing order."""
    rates = [f"{p:g}" for p in cfg.dropouts]
    return ("plain", *(f"drop{r}" for r in rates), "bn", *(f"bn+drop{r}" for r in sorted(rates, key=float)))


def arm_spec(arm: str) -> tuple[str, float]:
    """``(norm kind, dropout rate)`` of an arm's name."""
    base, _, rate = arm.partition("drop")
    return ("batch" if base.startswith("bn") else "none"), float(rate or 0)


def network(arm: str, cfg: RegularizationConfig) -> nn.Sequential:
    """The ``arm`` MLP at its initial state. Every arm gets the same linear weights (torch's default init of a
    reference MLP seeded by ``cfg.seed``) and zero biases, so the arms differ only in BN and dropout."""
    norm, rate = arm_spec(arm)
    net = make_mlp(SIZES, norm=norm, placement=cfg.placement, activation=cfg.activation, dropout=rate)
    with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
        torch.manual_seed(cfg.seed)
        ref = make_mlp(SIZES, norm="none", activation=cfg.activation)
    return load_weights(net, [m.weight.detach().numpy() for m in ref if isinstance(m, nn.Linear)])


def subset(ds, size: int, seed: int):
    """``ds`` with ``size`` training images drawn without replacement by ``seed`` (in their original order)."""
    n = len(ds.train_labels)
    if size > n:
        raise ValueError(f"train_size must be at most the {n:,} training images of {ds.source} data, got {size:,}")
    rows = np.sort(np.random.default_rng([seed, 2]).choice(n, size, replace=False))
    return replace(ds, train_images=ds.train_images[rows], train_labels=ds.train_labels[rows])


class _Measure:
    """Test loss and accuracy, train accuracy over the reduced training set, the gap; at step 0 and at the last
    step, for a BN network, the noise of its first BN layer (:func:`normlab.diagnostics.batch_noise` over what
    that layer normalizes for the reduced training set, with the layer's eps)."""

    def __init__(self, net: nn.Module, cfg: RegularizationConfig):
        self.cfg = cfg
        self.layer = next(iter(norm_layers(net).values()), None)

    def __call__(self, arm: TorchArm) -> dict:
        out = eval_metrics(arm)
        seen, hook = {}, None
        noise = self.layer is not None and arm.step in (0, self.cfg.steps)
        if noise:  # keep what the first BN layer normalizes during the train-accuracy pass
            hook = self.layer.register_forward_pre_hook(lambda m, a: seen.update(x=normalized_input(m, a[0])))
        try:
            logits = arm.net(arm.data.train_x)
        finally:
            if hook is not None:
                hook.remove()
        out["train_acc"] = (logits.argmax(dim=1) == arm.data.train_y).double().mean().item()
        out["gap"] = out["train_acc"] - out["test_acc"]
        if noise:
            cfg = self.cfg
            spread = batch_noise(seen["x"], cfg.noise_batch_sizes, example=cfg.noise_example, draws=cfg.noise_draws,
                                 eps=self.layer.eps, seed=cfg.seed)
            out.update({f"noise_m{m}": v for m, v in spread.items()})
        return out


@register
class Regularization(Experiment):
    name = "regularization"
    title = "does BN replace dropout? (reduced training set: accuracy, gap, the noise BN injects)"
    config = RegularizationConfig
    quick = {"steps": 300, "eval_every": 100, "seeds": 1, "noise_draws": 64}
    figure_name = "regularization.png"
    paper = ("Ioffe & Szegedy 2015, sections 3.4 and 4.2.1 (BN regularizes; dropout can be reduced or removed); "
             f"published context: CaffeNet128 BN + dropout ({SOURCE})")
    our_choices = ("lr", "steps", "train_size", "subset_seed", "activation", "placement", "eval_every",
                   "noise_batch_sizes", "noise_draws", "noise_example")
    order = 20

    def arms(self, cfg):
        return arm_names(cfg)

    def load_data(self, cfg, log):
        return subset(super().load_data(cfg, log), cfg.train_size, cfg.subset_seed)

    def build_arm(self, arm, cfg, ds, device):
        net = network(arm, cfg)
        order = DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
        return TorchArm(arm, net, device_data(ds, device), order, cfg.seed, device, lr=cfg.lr,
                        measure=_Measure(net, cfg))

    def summarize(self, cfg, records):
        return summarize(records, cfg)

    def table(self, summary, meta):
        return format_table(summary)

    def plot(self, records, meta):
        return plot_figure(records, meta)


# ---------------------------------------------------------------------------------------------------------------
# summary and table


def _noise_keys(rec: dict) -> list[int]:
    return sorted(int(k[len("noise_m"):]) for k in rec if k.startswith("noise_m"))


def summarize(records: list[dict], cfg: RegularizationConfig) -> dict:
    """Per arm, mean and std over the seeds of the final train/test accuracy and gap, and of the best test
    accuracy over the run; per BN arm, the noise per batch size at step 0 and at the last step."""
    seeds, arms, last = seed_list(cfg), arm_names(cfg), records[-1]
    out = {"final_step": last["step"], "seeds": seeds, "arms": list(arms), "final": {}, "best_test_acc": {},
           "noise": {}}

    def stat(values):
        m, sd = mean_std(values)
        return {"mean": m, "std": sd}

    for a in arms:
        keys = [_key(a, s, cfg) for s in seeds]
        out["final"][a] = {k: stat([last[u][k] for u in keys]) for k in ("train_acc", "test_acc", "gap")}
        out["best_test_acc"][a] = stat([max(r[u]["test_acc"] for r in records) for u in keys])
        if arm_spec(a)[0] == "batch":
            at = {"init": records[0], "trained": last}
            out["noise"][a] = {when: {str(m): stat([rec[u][f"noise_m{m}"] for u in keys])
                                      for m in _noise_keys(rec[keys[0]])} for when, rec in at.items()}
    return out


def _pm(st: dict, seeds: int, digits: int = 4) -> str:
    if st["mean"] is None:
        return "-"
    return f"{st['mean']:.{digits}f}" + (f" ± {st['std']:.{digits}f}" if seeds > 1 else "")


def verdict(summary: dict) -> list[str]:
    """Plain sentences comparing the arms, computed from the summary (final values, means over seeds). A
    difference smaller than twice the larger of the two seed stds is called within seed noise."""
    f = summary["final"]

    def cmp(a: str, b: str, metric: str = "test_acc") -> str:
        x, y = f[a][metric], f[b][metric]
        noise = len(summary["seeds"]) > 1 and abs(x["mean"] - y["mean"]) < 2 * max(x["std"], y["std"])
        word = {"test_acc": ("higher", "lower"), "gap": ("wider", "narrower")}[metric][x["mean"] < y["mean"]]
        return f"{x['mean']:.4f} vs {y['mean']:.4f}: {word}" + (", within seed noise" if noise else "")

    test = {a: v["test_acc"]["mean"] for a, v in f.items()}
    best = max(test, key=test.get)
    lines = [f"Best final test accuracy: **{best}** ({test[best]:.4f})."]
    if "plain" in f and "bn" in f:
        lines.append(f"BN alone against plain: test accuracy {cmp('bn', 'plain')}; gap {cmp('bn', 'plain', 'gap')}.")
    for a in (a for a in f if a.startswith("drop")):
        lines.append(f"BN alone against {a}: test accuracy {cmp('bn', a)}; gap {cmp('bn', a, 'gap')}.")
    for a in (a for a in f if a.startswith("bn+")):
        lines.append(f"{a} against BN alone: test accuracy {cmp(a, 'bn')}; gap {cmp(a, 'bn', 'gap')}.")
    return lines


NOTES = """\
*train acc* is measured in eval mode (running statistics, no dropout) over the {train:,} training images the
networks learn from; *gap* = train acc − test acc (10,000 test images). Values at step {step:,}, mean ± std over
{n} seed(s); *best test acc* is the highest test accuracy seen at any evaluation. The published column is
CaffeNet128 on ImageNet top-1 ({source}): BN after ReLU, dropout on fc6/fc7 only, 0.5 / 0.2 / 0; the no-BN row is
the same benchmark's CaffeNet128 with its standard fc dropout 0.5. Another network, data set and scale:
compare the ordering, not the values.

**The noise BN injects.** For one fixed training example (index {example} of the reduced set), its value at the
first BN layer is normalized with the statistics of {draws} random mini-batches of m examples that contain it
(before γ, β: x̂ = (x − μ_B) / sqrt(σ²_B + ε)); the table gives the std of x̂ over those mini-batches, averaged
over the layer's 100 units (`normlab.diagnostics.batch_noise`). *std · √m* is constant where the noise falls
like 1/√m, the sampling noise of a mean and a variance over m values (for large m, about
sqrt(1 + z²(κ−1)/4) for an example at z population standard deviations, κ the kurtosis). At m = 2 every x̂ is
±1, so the spread is bounded there.
"""


def format_table(summary: dict) -> str:
    """Accuracy, gap and the published numbers per arm; then the noise per batch size; then notes and verdict."""
    n = len(summary["seeds"])
    rows = []
    for a in summary["arms"]:
        f = summary["final"][a]
        rows.append((a, _pm(f["train_acc"], n), _pm(f["test_acc"], n), _pm(f["gap"], n),
                     _pm(summary["best_test_acc"][a], n), f"{PAPER[a]:.3f}" if a in PAPER else ""))
    out = [markdown_table(("arm", "train acc", "test acc", "gap", "best test acc", "published top-1"), rows)]
    noise = summary["noise"]
    if noise:
        bn_arms = list(noise)
        first = noise[bn_arms[0]]
        sizes = list(first["trained"])
        head = ("m", f"{bn_arms[0]} at init", *(f"{a} trained" for a in bn_arms), f"{bn_arms[0]} trained · √m")
        nrows = []
        for m in sizes:
            tr = first["trained"][m]
            scaled = {"mean": tr["mean"] * int(m) ** 0.5, "std": tr["std"] * int(m) ** 0.5}
            nrows.append((m, _pm(first["init"][m], n, 3), *(_pm(noise[a]["trained"][m], n, 3) for a in bn_arms),
                          _pm(scaled, n, 3)))
        out += ["", markdown_table(head, nrows)]
    cfg = summary.get("config", {})
    out += ["", NOTES.format(train=cfg.get("train_size", 0), step=summary["final_step"], n=n, source=SOURCE,
                             example=cfg.get("noise_example", 0), draws=cfg.get("noise_draws", 0)),
            "\n".join(f"- {line}" for line in verdict(summary))]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------
# the figure


def _by_arm(records: list[dict]) -> dict[str, list[str]]:
    arms: dict[str, list[str]] = {}
    for k in records[0]:
        if k != "step":
            arms.setdefault(k.partition("/")[0], []).append(k)
    return arms


def plot_figure(records: list[dict], meta: dict):
    """(a) train (dashed) and test (solid) accuracy against steps, (b) the gap against steps (mean over seeds,
    shaded ± std), (c) the BN noise against the batch size, at init and trained, with a 1/√m line. Returns the
    matplotlib Figure."""
    from normlab.lab.plots import pyplot, run_note

    plt = pyplot()
    from matplotlib import ticker

    arms = _by_arm(records)
    steps = np.array([r["step"] for r in records])
    colors = dict(zip(arms, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    def curve(keys, metric):
        v = np.array([[r[k][metric] for k in keys] for r in records])  # (evaluations, seeds)
        return v.mean(1), v.std(1, ddof=1) if v.shape[1] > 1 else np.zeros(len(v))

    for a, keys in arms.items():
        test, _ = curve(keys, "test_acc")
        train, _ = curve(keys, "train_acc")
        axes[0].plot(steps, test, "-", color=colors[a], label=f"{a}")
        axes[0].plot(steps, train, "--", color=colors[a], lw=1)
        gap, sd = curve(keys, "gap")
        axes[1].plot(steps, gap, "-", color=colors[a], label=a)
        axes[1].fill_between(steps, gap - sd, gap + sd, color=colors[a], alpha=0.15, lw=0)
    final = records[-1]
    # the step-0 accuracies (chance) would squash the curves: the axis starts a little below the lowest later one
    lo = min(r[k]["test_acc"] for r in records[1:] or records for keys in arms.values() for k in keys)
    lo = max(0.0, min(0.9, lo - 0.02))
    axes[0].set_ylim(lo, 1.001)
    axes[0].set_ylabel("accuracy (solid: test, dashed: train)")
    axes[0].set_title("(a) train and test accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].set_ylabel("train acc − test acc")
    axes[1].set_title("(b) generalization gap")
    for ax in axes[:2]:
        ax.set_xlabel("training steps")
        ax.set_xlim(steps[0], steps[-1])
        ax.grid(alpha=0.3)

    ax = axes[2]
    fit = []
    bn_arms = [a for a, keys in arms.items() if _noise_keys(final[keys[0]])]
    for a in bn_arms:
        keys, ms = arms[a], _noise_keys(final[arms[a][0]])
        # the BN arms start from the same weights: their noise at init is one curve, drawn once
        init = [(records[0], ":", "init")] if a == bn_arms[0] else []
        for rec, ls, when in (*init, (final, "-", f"trained, step {final['step']:,}")):
            v = np.array([[rec[k][f"noise_m{m}"] for k in keys] for m in ms]).mean(1)
            ax.plot(ms, v, ls, marker="o", ms=3, color=colors[a], label=f"{a} ({when})")
            if ls == "-" and a == bn_arms[0]:
                fit = [(m, x * m ** 0.5) for m, x in zip(ms, v) if m >= 16]
    if fit:
        c = float(np.mean([y for _, y in fit]))
        m = np.array(sorted({m for m, _ in fit} | {2, 4, 8}))
        ax.plot(m, c / np.sqrt(m), color="k", lw=0.8, alpha=0.6, label=f"{c:.2f}/√m (fit to {bn_arms[0]}, m ≥ 16)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())  # 2, 4, ..., 128 rather than 2^1, ...
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%.2g"))
    ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%.2g"))
    ax.set_xlabel("mini-batch size m")
    ax.set_ylabel("std of one example's x̂ across mini-batches")
    ax.set_title("(c) the noise BN injects (first BN layer)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")

    cfg = meta.get("config", {})
    note = (f"MLP {'-'.join(map(str, SIZES))} {cfg.get('activation', '?')}, {cfg.get('train_size', 0):,} training "
            f"images, SGD lr={cfg.get('lr', '?')}, batch {cfg.get('batch_size', '?')}, "
            f"{len(next(iter(arms.values())))} seed(s) from {cfg.get('seed', '?')}")
    extra = run_note(meta)
    fig.suptitle(f"Does BN replace dropout? {note}" + (f"\n{extra}" if extra else ""), fontsize=9)
    fig.tight_layout()
    return fig
