"""``normlab test-stats``: which statistics to normalize with at test time (Ioffe & Szegedy 2015, §3.1, Alg. 2).

One BN network is trained (the paper's MNIST MLP, 784-100-100-100-10, BN before each sigmoid, per seed), and the
same weights are evaluated with every candidate for BN's statistics at test time:

- ``batch``: the statistics of the test batch itself (BN left in training mode), at each test batch size; at batch
  size 1 they are undefined (x - μ_B = 0 and σ²_B = 0 for every channel) and recorded as None;
- ``ema<momentum>``: moving averages of the training batches' statistics (torch's ``momentum``: 0.1, 0.01);
- ``cumulative``: the cumulative average over every training batch (``momentum=None``);
- ``exact``: the population statistics of the whole training set, pooled over all its values with the current
  weights (:func:`normlab.precise_bn`: mean, and variance ``Σ (x - mean)² / (n - 1)`` over all n values);
- ``paper``: the paper's estimate (§3.1, Alg. 2 line 10): ``E_B[μ_B]`` and ``m/(m-1) · E_B[σ²_B]`` over the
  training set's mini-batches of size m, with the current weights;
- ``uncorrected``: the same without the ``m/(m-1)`` correction: ``E_B[σ²_B]``.

Momentum is a property of the running buffers only: in training BN normalizes with the batch's statistics, so
networks that differ only in their BN momentum follow identical weights. Instead of training one network per
momentum, the network keeps, beside its own buffers (the first of ``momenta``), one twin set of buffers per other
momentum and one cumulative set (:class:`Twins`); each twin folds exactly the batches its layer folds, by the
layer's own code, so it ends where that layer's buffers would with that momentum (tested against a network trained
with that momentum). The population statistics are recomputed at each evaluation for the current weights, over
one pass of the training set in the batches of the first epoch, with BN in training mode as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from normlab import nn as nl
from normlab.diagnostics import normalized_input, stats_distance
from normlab.lab import data as mnist_data
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data, mean_std, ours, seed_list, unit_key
from normlab.lab.metrics import markdown_table
from normlab.lab.models import SIZES, init_weights, load_weights, make_mlp
from normlab.lab.registry import register
from normlab.precise import precise_bn

EVAL_METHODS = ("cumulative", "exact", "paper", "uncorrected")  # after the ema<momentum> ones
SWEPT = ("batch", "exact")  # measured at every test batch size
POP_REFERENCE = "exact"
LABELS = {
    "batch": "batch statistics of the test batch",
    "cumulative": "cumulative average (momentum=None)",
    "exact": "population, exact (precise_bn)",
    "paper": "population, paper: m/(m-1)·E_B[σ²_B]",
    "uncorrected": "population, E_B[σ²_B] (no m/(m-1))",
}


@dataclass
class TestStatsConfig(RunConfig):
    """What decides a test-stats run's numbers; ``lr`` and ``init_std`` are normlab's, as for Figure 1."""

    __test__ = False  # not a pytest class, despite its name

    steps: int = field(default=10_000, metadata={"help": "training steps"})
    eval_every: int = field(default=1_000, metadata={"help": "steps between evaluations"})
    seeds: int = field(default=3, metadata={"help": "how many seeds, from --seed on: several give mean ± std"})
    lr: float = field(default=0.5, metadata=ours("SGD learning rate"))
    init_std: float = field(default=0.01, metadata=ours("std of the Gaussian initial weights"))
    activation: str = field(default="sigmoid", metadata={"help": "hidden units' non-linearity (the paper's: sigmoid)",
                                                         "choices": ("sigmoid", "tanh", "relu")})
    momenta: tuple[float, ...] = field(default=(0.1, 0.01), metadata={
        "help": "moving-average momenta of the running statistics kept (the first is the network's own BN momentum; "
                "the cumulative average, momentum=None, is always kept too)"})
    bn_eps: float = field(default=1e-5, metadata={"help": "BN's eps"})
    test_batch_sizes: tuple[int, ...] = field(default=(1, 2, 8, 60, 1000), metadata={
        "help": "test batch sizes to evaluate batch statistics at (at the last evaluation)"})

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [
            ("lr", self.lr > 0, "must be > 0"),
            ("init_std", self.init_std > 0, "must be > 0"),
            ("bn_eps", self.bn_eps > 0, "must be > 0"),
            ("momenta", len(self.momenta) >= 1 and all(0 < m <= 1 for m in self.momenta)
             and len(set(self.momenta)) == len(self.momenta), "must be distinct values in (0, 1], at least one"),
            ("test_batch_sizes", len(self.test_batch_sizes) >= 1 and all(b >= 1 for b in self.test_batch_sizes)
             and list(self.test_batch_sizes) == sorted(set(self.test_batch_sizes)),
             "must be increasing sizes >= 1, at least one"),
        ]


def ema_name(momentum: float) -> str:
    """The method name of a moving average: ``ema0.1``."""
    return f"ema{momentum:g}"


def methods(cfg: TestStatsConfig) -> tuple[str, ...]:
    """The statistics evaluated in eval mode (each example normalized alone), in table order."""
    return (*(ema_name(m) for m in cfg.momenta), *EVAL_METHODS)


def running_methods(cfg: TestStatsConfig) -> tuple[str, ...]:
    """The statistics gathered during training (compared with the exact population ones)."""
    return (*(ema_name(m) for m in cfg.momenta), "cumulative")


def label(method: str) -> str:
    """A method's name for people (tables, legends)."""
    if method.startswith("ema"):
        return f"moving average, momentum {method[3:]}"
    return LABELS[method]


# ---------------------------------------------------------------------------------------------------------------
# the network and its twin running statistics


def bn_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch-norm layers of ``net``, in order."""
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Twins(nn.Module):
    """Extra running statistics for ``layers`` (batch norm over ``(N, C)``), one set per momentum in ``momenta``.

    A forward pre-hook on each layer feeds whatever the layer normalizes to its twins (plain ``BatchNorm1d``, no
    affine, one per momentum) whenever the layer folds a batch into its own running statistics (training mode,
    ``track_running_stats``), so that set ``k`` ends where the layer's buffers would with ``momenta[k]``. The twins'
    buffers are this module's (saved with the network's state).
    """

    def __init__(self, layers: list[nn.Module], momenta: tuple[float | None, ...]):
        super().__init__()
        self.sets = nn.ModuleList(nn.ModuleList(nl.BatchNorm1d(bn.num_features, eps=bn.eps, momentum=m, affine=False)
                                                for bn in layers) for m in momenta)
        self._handles = [bn.register_forward_pre_hook(self._hook(i)) for i, bn in enumerate(layers)]

    def _hook(self, i: int):
        def hook(module, args):
            if module.training and module.track_running_stats:
                x = normalized_input(module, args[0]).detach()
                with torch.no_grad():
                    for twins in self.sets:
                        twins[i](x)

        return hook

    def stats(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Set ``k``'s ``(running_mean, running_var)`` per layer (copies)."""
        return [(t.running_mean.clone(), t.running_var.clone()) for t in self.sets[k]]

    def reset(self) -> None:
        """Every twin back to its initial statistics (mean 0, variance 1, no batch counted)."""
        for twins in self.sets:
            for t in twins:
                t.reset_running_stats()


class TrackedNet(nn.Module):
    """The BN network ``net`` with :class:`Twins` for the other momenta: ``forward`` is ``net``'s."""

    def __init__(self, net: nn.Module, momenta: tuple[float | None, ...]):
        super().__init__()
        self.net = net
        self.twins = Twins(bn_layers(net), momenta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(cfg: TestStatsConfig) -> nn.Sequential:
    """The BN network at its initial state: ``[Linear(no bias) -> BN + activation] x 3 -> Linear``, Figure 1's
    weights for ``cfg.seed``; its BN momentum is ``cfg.momenta[0]``."""
    net = make_mlp(SIZES, norm="batch", activation=cfg.activation, eps=cfg.bn_eps, momentum=cfg.momenta[0])
    return load_weights(net, init_weights(cfg.seed, cfg.init_std))


def network(cfg: TestStatsConfig) -> TrackedNet:
    """The trained network of an arm: :func:`mlp` with twins for ``momenta[1:]`` and the cumulative average."""
    return TrackedNet(mlp(cfg), (*cfg.momenta[1:], None))


def set_stats(layers: list[nn.Module], stats: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``(mean, var)`` per layer into the layers' running buffers."""
    with torch.no_grad():
        for bn, (mean, var) in zip(layers, stats):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)


def split_test_set(n: int, b: int, seed: int) -> list[np.ndarray]:
    """The test set's rows in a seeded random order, split into ``n // b`` batches whose sizes differ by at most one,
    each of at least ``b`` rows, or one batch when ``n < b`` (every image classified once; 10,000 images at b = 60:
    126 batches of 60 and 40 of 61)."""
    order = np.random.default_rng([seed, 2]).permutation(n)
    return np.array_split(order, max(n // b, 1))


@torch.no_grad()
def accuracy_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[np.ndarray] | None = None,
                batch_stats: bool = False) -> float:
    """Test accuracy of ``net`` on ``x``, ``y`` in ``batches`` (one batch when None); ``batch_stats``: BN normalizes
    with each batch's own statistics (training mode, running buffers untouched), else with its running ones."""
    layers = bn_layers(net)
    net.eval()
    if batch_stats:
        for bn in layers:
            bn.train()
            bn.track_running_stats = False  # normalize with the batch, fold nothing into the buffers
    try:
        rows = [torch.arange(len(y), device=y.device)] if batches is None else \
            [torch.from_numpy(r).to(y.device) for r in batches]
        correct = sum(int((net(x[r]).argmax(dim=1) == y[r]).sum()) for r in rows)
    finally:
        for bn in layers:
            bn.track_running_stats = True
            bn.eval()
    return correct / len(y)


# ---------------------------------------------------------------------------------------------------------------
# what is measured at each evaluation


class _Measure:
    """At each evaluation, on a copy of the trained network: the population statistics of the training set for the
    current weights (exact and the paper's estimate, in one pass), the test accuracy with every set of statistics,
    how far each running set is from the exact one per layer, and at the last evaluation every test batch size."""

    def __init__(self, cfg: TestStatsConfig, device: str):
        self.cfg = cfg
        self.net = mlp(cfg).to(device)  # the evaluation copy: the trained network is never touched
        self.layers = bn_layers(self.net)
        self.paper = Twins(self.layers, (None,)).to(device)  # E_B[μ_B], m/(m-1)·E_B[σ²_B] during precise_bn's pass

    def population(self, arm: TorchArm) -> dict[str, list]:
        """Per method (exact, paper, uncorrected), ``(mean, var)`` per layer for the weights loaded in ``self.net``,
        over the training set in epoch 0's batches of m (a network that diverged raises precise_bn's ValueError)."""
        self.paper.reset()
        rows = arm.order.segment(0, arm.order.per_epoch)  # one pass over the training set: epoch 0's batches
        x = arm.data.train_x
        precise_bn(self.net, (x[torch.from_numpy(r).to(x.device)] for r in rows))
        m = arm.order.batch_size
        paper = self.paper.stats(0)
        return {"exact": [(bn.running_mean.clone(), bn.running_var.clone()) for bn in self.layers],
                "paper": paper, "uncorrected": [(mean, var * ((m - 1) / m)) for mean, var in paper]}

    def __call__(self, arm: TorchArm) -> dict:
        cfg, tracked = self.cfg, arm.net
        self.net.load_state_dict(tracked.net.state_dict())
        stats = {ema_name(cfg.momenta[0]): [(bn.running_mean.clone(), bn.running_var.clone())
                                            for bn in bn_layers(tracked.net)]}
        for k, name in enumerate((*(ema_name(m) for m in cfg.momenta[1:]), "cumulative")):
            stats[name] = tracked.twins.stats(k)
        stats.update(self.population(arm))

        x, y = arm.data.test_x, arm.data.test_y
        out = {}
        for name in methods(cfg):
            set_stats(self.layers, stats[name])
            out[f"acc/{name}"] = accuracy_of(self.net, x, y)
            if name == ema_name(cfg.momenta[0]):
                logits = self.net.eval()(x)
                out["test_loss"] = nn.functional.cross_entropy(logits, y).item()
                out["test_acc"] = out[f"acc/{name}"]  # the network as deployed by default (progress bar)
        for name in (*running_methods(cfg), "paper", "uncorrected"):
            for i, ((mean, var), (ref_mean, ref_var)) in enumerate(zip(stats[name], stats[POP_REFERENCE]), 1):
                d = stats_distance(mean, var, ref_mean, ref_var, cfg.bn_eps)
                out.update({f"gap/l{i}/{name}/{k}": v for k, v in d.items()})

        # the test batch sizes: the largest at every evaluation, all of them at the last (b = 1 is slow)
        last = arm.step >= cfg.steps
        set_stats(self.layers, stats["exact"])
        for b in cfg.test_batch_sizes:
            measure = last or b == cfg.test_batch_sizes[-1]
            batches = split_test_set(len(y), b, cfg.seed) if measure else None
            for name in SWEPT:
                key = f"acc/{name}/b{b}"
                if not measure or (name == "batch" and b < 2):
                    out[key] = None  # not measured now; batch statistics of one example are undefined
                    continue
                out[key] = accuracy_of(self.net, x, y, batches, batch_stats=name == "batch")
        return out


# ---------------------------------------------------------------------------------------------------------------
# the experiment


@register
class TestStats(Experiment):
    __test__ = False

    name = "test-stats"
    title = "which statistics to use at test time: batch, moving averages, or the population's (§3.1)"
    config = TestStatsConfig
    quick = {"steps": 600, "eval_every": 300, "seeds": 1}  # ~20 s of CPU, most of it the last evaluation
    figure_name = "test_stats.png"
    paper = "Ioffe & Szegedy 2015, section 3.1 and Algorithm 2 (inference with population statistics)"
    our_choices = ("lr", "init_std", "momenta", "eval_every", "test_batch_sizes")
    order = 40

    def arms(self, cfg):
        return ("bn",)

    def label(self, arm):
        base, _, seed = arm.partition("/")
        return "BN network" + (f" {seed}" if seed else "")

    def build_arm(self, arm, cfg, ds, device):
        order = mnist_data.DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
        return TorchArm(arm, network(cfg), device_data(ds, device), order, cfg.seed, device, lr=cfg.lr,
                        measure=_Measure(cfg, device))

    def summarize(self, cfg, records):
        return summarize(cfg, records)

    def table(self, summary, meta):
        return format_table(summary)

    def plot(self, records, meta):
        return plot_figure(records, meta)


def _across(values: list) -> dict:
    m, sd = mean_std(values)
    return {"mean": m, "std": sd}


def summarize(cfg: TestStatsConfig, records: list[dict]) -> dict:
    """The last evaluation's numbers, mean and std over the seeds: accuracy per method, per method and test batch
    size (None where undefined), and per layer the running statistics' distance from the exact population ones."""
    seeds = seed_list(cfg)
    last = records[-1]
    keys = [unit_key("bn", s, cfg) for s in seeds]

    def gather(metric):
        return _across([last[k][metric] for k in keys])

    n_layers = len(SIZES) - 2
    out = {
        "final_step": last["step"], "seeds": seeds, "batch_size": cfg.batch_size,
        "momenta": list(cfg.momenta), "test_batch_sizes": list(cfg.test_batch_sizes),
        "methods": list(methods(cfg)),
        "acc": {name: gather(f"acc/{name}") for name in methods(cfg)},
        "acc_by_batch": {name: {str(b): gather(f"acc/{name}/b{b}") for b in cfg.test_batch_sizes}
                         for name in SWEPT},
        "undefined": [f"batch/b{b}" for b in cfg.test_batch_sizes if b < 2],
        "gap": {name: {f"l{i}": {k: gather(f"gap/l{i}/{name}/{k}") for k in ("mean_gap", "mean_gap_rel", "var_ratio")}
                       for i in range(1, n_layers + 1)}
                for name in (*running_methods(cfg), "paper", "uncorrected")},
    }
    # the population ones do not depend on the test batch size: the largest spread of their accuracy over the sizes
    spread = {}
    for name in out["acc_by_batch"]:
        if name == "batch":
            continue
        per_seed = [[last[k][f"acc/{name}/b{b}"] for b in cfg.test_batch_sizes] for k in keys]
        spread[name] = max((max(v) - min(v) for v in per_seed if None not in v), default=None)
    out["spread_over_batch_sizes"] = spread
    return out


def _fmt(stat: dict, many: bool, digits: int = 4) -> str:
    m, sd = stat["mean"], stat["std"]
    if m is None:
        return "–"
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if many else f"{m:.{digits}f}"


NOTES = """\
**Rows.** *Batch statistics*: BN normalizes each test batch with its own mean and variance (training mode, as
in training); the test set, in a seeded random order, is split into N // b batches of b images or one more. At b = 1
they are **undefined**: each channel has one value, so x − μ_B = 0 and σ²_B = 0 and every output is β whatever
the image (normlab and torch refuse the call); the table says so instead of a number. Every other row normalizes
each example alone with fixed statistics (eval mode), so its accuracy cannot depend on the test batch size: the
exact population row was measured at every size anyway (largest difference over the sizes: {spread}), the others
on the whole test set in one batch (second table). *Moving averages* and the *cumulative average* are gathered in
training from the training batches' statistics (the cumulative one weighs every step alike, the first ones
included). *Population* rows are computed for the final weights over one pass of the 60,000 training images in
batches of m = {m}, BN in training mode: *exact* pools every value (normlab.precise_bn: variance divided by n − 1
over all n values); *paper* averages the batch means and the biased batch variances and multiplies the latter by
m/(m−1) = {corr:.4f} (§3.1); *no m/(m−1)* leaves that factor out. The exact variance is E_B[σ²_B] plus the
variance of the batch means, so the paper's factor matches it where batch means vary as for independent samples.

**Distance from the exact population statistics** (second table, last evaluation): per layer, the mean over the
100 channels of |μ − μ_pop| in units of σ_pop, and the mean of σ² / σ²_pop (1 is exact).

**The paper** (§3.1, Algorithm 2) prescribes, for inference, the population statistics E[x] = E_B[μ_B] and the
unbiased Var[x] = m/(m−1)·E_B[σ²_B] over training mini-batches of size m, and mentions moving averages only to
track a model's accuracy as it trains. It reports no accuracy for this choice, so there is no published number to
put beside ours; the last column says what it prescribes. Later work (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm", arXiv:2105.07576) found precise population statistics (PreciseBN) better and more stable than the
moving average on ImageNet.
"""


def format_table(summary: dict) -> str:
    """Two Markdown tables (accuracy by test batch size and by statistics; running statistics' distance from the
    population's per layer) and the notes that explain them."""
    sizes = summary["test_batch_sizes"]
    many = len(summary["seeds"]) > 1
    own = ema_name(summary["momenta"][0])
    prescribes = {"batch": "in training only", "exact": "what it estimates", "paper": "**yes** (its estimator)",
                  "uncorrected": "no (biased)", "cumulative": "–", own: "only to track training"}
    rows = []
    for name in SWEPT:
        cells = []
        for b in sizes:
            stat = summary["acc_by_batch"][name][str(b)]
            cells.append("undefined" if f"{name}/b{b}" in summary["undefined"] else _fmt(stat, many))
        rows.append((label(name), *cells, prescribes.get(name, "")))
    table1 = markdown_table(("test accuracy at test batch size b", *(f"b={b}" for b in sizes),
                             "paper prescribes"), rows)

    n_layers = len(next(iter(summary["gap"].values())))
    rows = []
    for name in summary["methods"]:
        gap = summary["gap"].get(name)
        cells = [_fmt(summary["acc"][name], many)]
        for i in range(1, n_layers + 1):
            if gap is None:
                cells += ["0 (reference)", "1 (reference)"]
            else:
                cells += [_fmt(gap[f"l{i}"]["mean_gap_rel"], many, 3), _fmt(gap[f"l{i}"]["var_ratio"], many, 3)]
        rows.append((label(name), *cells, prescribes.get(name, "")))
    head = ["statistics (eval mode, any b)", "test acc"]
    for i in range(1, n_layers + 1):
        head += [f"L{i} |μ−μ_pop|/σ_pop", f"L{i} σ²/σ²_pop"]
    table2 = markdown_table((*head, "paper prescribes"), rows)

    spread = summary["spread_over_batch_sizes"]
    m = summary["batch_size"]
    spread_text = ", ".join(f"{v:.4f}" if v is not None else "not measured" for v in spread.values())
    seeds = summary["seeds"]
    head_note = (f"After {summary['final_step']:,} training steps; " +
                 (f"mean ± std over seeds {seeds[0]}–{seeds[-1]}." if len(seeds) > 1 else f"seed {seeds[0]}."))
    return "\n\n".join([head_note, table1, table2, NOTES.format(spread=spread_text, m=m, corr=m / (m - 1))])


# ---------------------------------------------------------------------------------------------------------------
# the figure


STYLE = {"batch": ("tab:red", "o-"), "exact": ("black", "s-"), "paper": ("tab:gray", "--"),
         "uncorrected": ("tab:brown", ":"), "cumulative": ("tab:purple", "-.")}
EMA_COLORS = ("tab:blue", "tab:cyan", "tab:green", "tab:olive")


def _style(method: str, cfg: dict) -> tuple[str, str]:
    if method.startswith("ema"):
        momenta = [ema_name(m) for m in cfg.get("momenta", [])]
        i = momenta.index(method) if method in momenta else 0
        return EMA_COLORS[i % len(EMA_COLORS)], "^-" if i == 0 else "v-"
    return STYLE[method]


def plot_figure(records: list[dict], meta: dict):
    """(a) test accuracy against the test batch size per statistics (last evaluation, mean over the seeds);
    (b) test accuracy over training per statistics; (c, d) the running statistics' distance from the exact
    population ones over training, averaged over the layers: |μ − μ_pop| / σ_pop and σ² / σ²_pop."""
    from normlab.lab.plots import pyplot, run_note

    plt = pyplot()
    c = meta.get("config", {})
    cfg = TestStatsConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()
                             if k in TestStatsConfig.__dataclass_fields__})
    keys = [unit_key("bn", s, cfg) for s in seed_list(cfg)]
    last = records[-1]
    steps = [r["step"] for r in records]
    n_layers = len(SIZES) - 2

    def avg(record, metric):
        vals = [record[k][metric] for k in keys]
        return None if None in vals else float(np.mean(vals))

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    ax = axes[0]
    sizes = list(cfg.test_batch_sizes)
    for name in SWEPT:
        ys = [avg(last, f"acc/{name}/b{b}") for b in sizes]
        pts = [(b, v) for b, v in zip(sizes, ys) if v is not None]
        color, fmt = _style(name, c)
        if pts:
            ax.plot(*zip(*pts), fmt, color=color, label=label(name))
    for name in methods(cfg):
        if name in SWEPT:
            continue
        color, fmt = _style(name, c)
        ax.axhline(avg(last, f"acc/{name}"), color=color, ls=fmt.lstrip("o^vs") or "-", lw=1, label=label(name))
    for b in sizes:
        if b < 2:
            ax.plot([b], [0.03], "x", color=STYLE["batch"][0], ms=9)
            ax.annotate("batch statistics\nundefined at b=1", (b, 0.07), fontsize=8, color=STYLE["batch"][0])
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("test batch size b")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"(a) accuracy vs test batch size (step {last['step']:,})", fontsize=10)
    ax.legend(fontsize=6.5, loc="center right", title="markers: measured at each b; lines: eval mode (per example)",
              title_fontsize=6.5)

    ax = axes[1]
    for name in methods(cfg):
        color, fmt = _style(name, c)
        ax.plot(steps, [avg(r, f"acc/{name}") for r in records], fmt.lstrip("o^vs") or "-", color=color,
                label=label(name))
    seen = [avg(r, f"acc/{name}") for r in records[1:] or records for name in methods(cfg)]  # after step 0
    ax.set_ylim(max(0.0, min(seen) - 0.01), min(1.0, max(seen) + 0.01))
    ax.set_ylabel("test accuracy")
    ax.set_title("(b) accuracy over training, by statistics", fontsize=10)
    ax.legend(fontsize=6.5, loc="center right", bbox_to_anchor=(1.0, 0.6))

    # from the first evaluation after step 0: at step 0 the buffers hold their initial mean 0 and variance 1
    trained = [r for r in records if r["step"] > 0] or records
    for ax, metric, title in ((axes[2], "mean_gap_rel", "(c) |μ − μ_pop| / σ_pop, mean over layers"),
                              (axes[3], "var_ratio", "(d) σ² / σ²_pop, mean over layers")):
        # the paper's mean is the exact one (equal batches): no gap to draw on a log scale
        for name in (*running_methods(cfg), *(("paper", "uncorrected") if metric == "var_ratio" else ())):
            color, fmt = _style(name, c)
            ys = [np.mean([avg(r, f"gap/l{i}/{name}/{metric}") for i in range(1, n_layers + 1)]) for r in trained]
            ax.plot([r["step"] for r in trained], ys, fmt.lstrip("o^vs") or "-", color=color, label=label(name))
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        if metric == "mean_gap_rel":
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="black", lw=0.5)
    for ax in axes[1:]:
        ax.set_xlabel("training steps")
        ax.set_xlim(0, steps[-1])
    for ax in axes:
        ax.grid(alpha=0.3)
    seeds = seed_list(cfg)
    note = (f"MNIST MLP 784-100-100-100-10, BN before {cfg.activation}, SGD lr={cfg.lr}, batch {cfg.batch_size}; "
            + (f"mean of seeds {seeds[0]}–{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"))
    extra = run_note(meta)
    fig.suptitle("Which statistics at test time (Ioffe & Szegedy 2015, §3.1): " + note
                 + (f"\n{extra}" if extra else ""), fontsize=9)
    fig.tight_layout()
    return fig

