"""``normlab mnist``: the MNIST experiment of Ioffe & Szegedy 2015, §4.1 (Figure 1).

Two 784-100-100-100-10 sigmoid networks, one without (arm ``plain``) and one with batch norm before each sigmoid
(arm ``bn``), start from the same weights and see the same mini-batches in the same order. Every ``eval_every``
steps both are evaluated on the whole test set (the BN network in eval mode, with its running statistics), and the
15th/50th/85th percentiles of one last-hidden-layer sigmoid's input over the test images are recorded (with
:class:`normlab.diagnostics.NormMonitor` on that sigmoid).

The paper gives no optimizer, learning rate or initial weight scale; the defaults of :class:`MnistConfig` are
normlab's choices and are written into every run's ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from normlab.diagnostics import NormMonitor
from normlab.lab import data as mnist_data
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data, eval_metrics, mean_std, ours, seed_list
from normlab.lab.experiment import unit_key as _key
from normlab.lab.metrics import markdown_table, steps_to_reach, value_at
from normlab.lab.models import SIZES, init_weights, load_weights, make_mlp
from normlab.lab.registry import register

ENGINES = ("torch", "numpy")
ARMS = ("plain", "bn")  # the network without, then with batch norm
LABELS = {"plain": "without BN", "bn": "with BN"}
PERCENTILES = (15, 50, 85)  # Figure 1(b, c): {15, 50, 85}th percentiles of one sigmoid's input
ACC_STEPS = (5_000, 10_000, 20_000, 50_000)
THRESHOLDS = (0.95, 0.97)
# Read off the paper's Figure 1(a) at 50k steps; the paper prints no table, so nothing else is given.
PAPER_AT_50K = {"plain": "0.96-0.97", "bn": "0.98"}


@dataclass
class MnistConfig(RunConfig):
    """Everything that decides a Figure 1 run's numbers. ``lr``, ``init_std`` and ``optimizer`` are normlab's."""

    steps: int = field(default=50_000, metadata={"help": "training steps"})
    lr: float = field(default=0.5, metadata=ours("SGD learning rate"))
    init_std: float = field(default=0.01, metadata=ours("std of the Gaussian initial weights"))
    optimizer: str = field(default="sgd", metadata={"help": "plain SGD: no momentum, no weight decay, constant rate",
                                                    "choices": ("sgd",)})
    bn_momentum: float = field(default=0.1, metadata={"help": "momentum of BN's running statistics (torch's)"})
    bn_eps: float = field(default=1e-5, metadata={"help": "BN's eps"})
    engine: str = field(default="torch", metadata={"help": "torch, or numpy with normlab.reference",
                                                   "choices": ENGINES})
    standardize: bool = field(default=False, metadata={
        "help": "standardize inputs per pixel with training-set mean and std (default: pixels / 255)"})
    probe_unit: int = field(default=0, metadata={"help": "which last-hidden-layer sigmoid Figure 1(b, c) follows"})

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [
            ("lr", self.lr > 0, "must be > 0"),
            ("init_std", self.init_std > 0, "must be > 0"),
            ("engine", self.engine in ENGINES, f"must be one of {ENGINES}"),
            ("optimizer", self.optimizer == "sgd", "must be 'sgd'"),
            ("probe_unit", 0 <= self.probe_unit < 100, "must be in [0, 100)"),
            ("bn_momentum", 0 < self.bn_momentum <= 1, "must be in (0, 1]"),
        ]


def network(arm: str, cfg: MnistConfig):
    """The ``arm`` network (torch) at its initial state: the paper's MLP with the shared Gaussian weights.

    ``plain``: ``[Linear(+bias) -> sigmoid] x 3 -> Linear(+bias)``; ``bn``: ``[Linear(no bias) -> BatchNorm1d ->
    sigmoid] x 3 -> Linear(+bias)`` (BN's β takes the bias's place). Unfused, so the sigmoid's input can be watched.
    """
    net = make_mlp(SIZES, norm="batch" if arm == "bn" else "none", activation="sigmoid", fuse=False,
                   eps=cfg.bn_eps, momentum=cfg.bn_momentum)
    return load_weights(net, init_weights(cfg.seed, cfg.init_std))


class _Measure:
    """Test loss and accuracy, and the percentiles of the probe sigmoid's input, recorded by a NormMonitor hook on
    the last hidden layer's sigmoid during the evaluation's forward pass."""

    def __init__(self, net, unit: int):
        sigmoid = [m for m in net.modules() if isinstance(m, torch.nn.Sigmoid)][-1]
        self.monitor = NormMonitor(layers={"probe": sigmoid}, mode="eval", q=PERCENTILES, gap=False,
                                   select=lambda t: t[:, unit])

    def __call__(self, arm: TorchArm) -> dict:
        out = eval_metrics(arm)
        rec = self.monitor.latest("probe")
        self.monitor.records.clear()
        return {**out, **{f"p{p}": rec[f"p{p}"] for p in PERCENTILES}}


@register
class Mnist(Experiment):
    name = "mnist"
    title = "reproduce the paper's MNIST experiment (Figure 1)"
    config = MnistConfig
    quick = {"steps": 4000, "eval_every": 250}  # long enough for BN to pull ahead, well under a minute on 2 cores
    figure_name = "figure1.png"
    paper = "Ioffe & Szegedy 2015, section 4.1, Figure 1"
    our_choices = ("optimizer", "lr", "init_std", "bn_momentum", "eval_every", "probe_unit")
    order = 0

    def arms(self, cfg):
        return ARMS

    def label(self, arm):
        base, _, seed = arm.partition("/")
        return LABELS.get(base, base) + (f" {seed}" if seed else "")

    def build_arm(self, arm, cfg, ds, device):
        order = mnist_data.DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
        if cfg.engine == "numpy":
            from normlab.lab.numpy_engine import NumpyNet

            return NumpyNet(arm, init_weights(cfg.seed, cfg.init_std), mnist_data.prepare_inputs(ds, cfg.standardize),
                            order, cfg.lr, cfg.bn_momentum, cfg.bn_eps, cfg.probe_unit)
        net = network(arm, cfg)
        return TorchArm(arm, net, device_data(ds, device, cfg.standardize), order, cfg.seed, device, lr=cfg.lr,
                        measure=_Measure(net, cfg.probe_unit))

    def summarize(self, cfg, records):
        return summarize(records, cfg)

    def table(self, summary, meta):
        return format_table(summary)

    def plot(self, records, meta):
        return plot_figure1(records, meta)


# ---------------------------------------------------------------------------------------------------------------
# summary and table


def summarize(records: list[dict], cfg: RunConfig | None = None) -> dict:
    """The run's headline numbers from its metrics records (sorted by step). Accuracies and steps are means over
    the seeds (``*_std``: their std); the percentiles are the first seed's network's, as Figure 1 shows one."""
    cfg = cfg or RunConfig()
    seeds = seed_list(cfg)
    last = records[-1]
    trained = [r for r in records if r["step"] > 0] or records
    out = {"final_step": last["step"], "seeds": seeds, "final": {}, "final_std": {}, "acc_at": {}, "acc_at_std": {},
           "steps_to": {}, "percentiles": {}}

    def across(fn):
        return {a: mean_std([fn(_key(a, s, cfg)) for s in seeds]) for a in ARMS}

    for a, (m, sd) in across(lambda k: last[k]["test_acc"]).items():
        out["final"][a], out["final_std"][a] = m, sd
    for a in ARMS:
        k = _key(a, seeds[0], cfg)
        p50 = [r[k]["p50"] for r in trained]
        spread = [r[k]["p85"] - r[k]["p15"] for r in trained]
        out["percentiles"][a] = {
            "first": {p: trained[0][k][p] for p in ("p15", "p50", "p85")},  # first evaluation after training began
            "last": {p: last[k][p] for p in ("p15", "p50", "p85")},
            "p50_range": max(p50) - min(p50),  # how far the median wanders over the run
            "spread_range": max(spread) - min(spread),  # how far the 15-85 width wanders
        }
    for s in ACC_STEPS:
        stats = across(lambda k, s=s: value_at(records, s, k))
        out["acc_at"][str(s)] = {a: m for a, (m, _) in stats.items()}
        out["acc_at_std"][str(s)] = {a: sd for a, (_, sd) in stats.items()}
    for t in THRESHOLDS:
        stats = across(lambda k, t=t: steps_to_reach(records, k, t))
        # one seed: the step itself (an int), several: their mean
        out["steps_to"][f"{t:.2f}"] = {a: m if m is None or len(seeds) > 1 else int(m) for a, (m, _) in stats.items()}
    return out


def _acc(summary: dict, mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" if len(summary.get("seeds", [0])) == 1 else f"{mean:.4f} ± {std:.4f}"


NOTES = """\
The paper prints no table: the one number it gives is Figure 1(a) at 50k steps, read off the plot (≈ 0.96-0.97
without BN, ≈ 0.98 with BN). Rows without a published value leave the paper's column blank.

The two percentile rows follow one sigmoid of the last hidden layer (unit {unit}). At each evaluation after step 0
we take the 15th, 50th and 85th percentiles of its input over the test images. *Median range* is how far that
median wanders over the run (largest minus smallest value); *15-85 width range* is how much the spread between
the 15th and 85th percentiles changes. Small numbers mean the layer sees a stable input distribution, which is
what BN gives in the paper's Figure 1(c); large ones are the drift of Figure 1(b) without BN.
"""


def format_table(summary: dict) -> str:
    """The run's Markdown table: accuracy at fixed steps, steps to 95%/97%, the paper's values beside ours, and
    the notes that explain the rows."""
    final_step = summary["final_step"]
    rows = []
    std = summary.get("acc_at_std", {})
    for s in ACC_STEPS:
        acc, sd = summary["acc_at"][str(s)], std.get(str(s), {})
        paper = f"≈ {PAPER_AT_50K['plain']} / ≈ {PAPER_AT_50K['bn']}" if s == 50_000 else ""
        if s <= final_step:
            rows.append((f"test acc @ {s // 1000}k steps", *(_acc(summary, acc[a], sd.get(a)) for a in ARMS), paper))
        elif paper:  # the paper's one number stays in view, even when this run stops short of it
            rows.append((f"test acc @ {s // 1000}k steps", *[f"(run ends at {final_step:,})"] * 2, paper))
    if final_step not in ACC_STEPS:
        f, fs = summary["final"], summary.get("final_std", {})
        rows.insert(sum(s < final_step for s in ACC_STEPS),
                    (f"test acc @ {final_step:,} (final)", *(_acc(summary, f[a], fs.get(a)) for a in ARMS), ""))
    never = f"> {final_step:,}"  # not reached within the run
    for t, reach in summary["steps_to"].items():
        rows.append((f"steps to {float(t):.0%}", *(never if reach[a] is None else f"{reach[a]:,.0f}" for a in ARMS),
                     ""))
    p = summary["percentiles"]
    rows.append(("sigmoid input: median range", f"{p['plain']['p50_range']:.3f}", f"{p['bn']['p50_range']:.3f}",
                 "drifts / stable (Fig. 1b, c)"))
    rows.append(("sigmoid input: 15-85 width range", f"{p['plain']['spread_range']:.3f}",
                 f"{p['bn']['spread_range']:.3f}", "drifts / stable (Fig. 1b, c)"))
    table = markdown_table(("", LABELS["plain"], LABELS["bn"], "paper: without / with BN"), rows)
    unit = summary.get("config", {}).get("probe_unit", 0)
    return table + "\n\n" + NOTES.format(unit=unit)


# ---------------------------------------------------------------------------------------------------------------
# the figure


def plot_figure1(records: list[dict], meta: dict):
    """The paper's Figure 1 from a run's records: (a) test accuracy against steps, with and without BN; (b, c)
    the 15th, 50th and 85th percentiles of the probe sigmoid's input without and with BN, on a shared y-axis so
    that a drift in one and a flat line in the other read as what they are. Returns the matplotlib Figure."""
    from normlab.lab.plots import pyplot, run_note

    plt = pyplot()
    cfg = meta.get("config", {})
    keys = {a: (a if a in records[0] else f"{a}/s{cfg.get('seed', 0)}") for a in ARMS}  # the first seed's network
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
    style = {"plain": ("tab:gray", "--"), "bn": ("tab:blue", "-")}

    ax = axes[0]
    for a, (color, ls) in style.items():
        ax.plot(steps, [r[keys[a]]["test_acc"] for r in records], ls, color=color, label=LABELS[a])
    # The paper's axis starts at 0.7; a short run that has not got there yet gets the whole range.
    ax.set_ylim(0.7 if min(records[-1][keys[a]]["test_acc"] for a in ARMS) >= 0.9 else 0.0, 1.0)
    ax.set_ylabel("test accuracy")
    ax.set_title("(a) test accuracy")
    ax.legend(loc="lower right")

    lo = min(min(r[keys[a]]["p15"] for r in records) for a in ARMS)
    hi = max(max(r[keys[a]]["p85"] for r in records) for a in ARMS)
    pad = 0.05 * (hi - lo or 1.0)
    for ax, a, name in zip(axes[1:], ARMS, ("(b)", "(c)")):
        color = style[a][0]
        for p, ls in (("p85", ":"), ("p50", "-"), ("p15", "--")):
            ax.plot(steps, [r[keys[a]][p] for r in records], ls, color=color, label=f"{p[1:]}th pct")
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel("sigmoid input")
        ax.set_title(f"{name} {LABELS[a]}: 15/50/85th percentiles")
        ax.legend(loc="best", fontsize=8)
    for ax in axes:
        ax.set_xlabel("training steps")
        ax.set_xlim(steps[0], steps[-1])
        ax.grid(alpha=0.3)

    note = (f"{cfg.get('engine', '?')} engine, {cfg.get('optimizer', '?')} lr={cfg.get('lr', '?')}, "
            f"init std={cfg.get('init_std', '?')}, batch {cfg.get('batch_size', '?')}, seed {cfg.get('seed', '?')}")
    extra = run_note(meta)
    fig.suptitle(f"MNIST, 784-100-100-100-10 sigmoid network (Ioffe & Szegedy 2015, Fig. 1): {note}"
                 + (f"\n{extra}" if extra else ""), fontsize=9)
    fig.tight_layout()
    return fig
