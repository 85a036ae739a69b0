"""``normlab batch-size``: what happens to each normalization when the batch is small (issue 11).

The small CNN of :func:`normlab.lab.models.make_cnn` is trained on the first ``train_images`` MNIST training
images with six normalizations: batch norm, group norm, layer norm, instance norm, batch renorm and ghost batch
norm, at per-step batch sizes ``batch_sizes`` (2 to 64), for the same number of epochs: every network sees the
same images in the same order, and a smaller batch takes more, smaller SGD steps over them.

How the arms share one data order: a runner step is one batch of ``batch_size`` (64) images of a
:class:`~normlab.lab.data.DataOrder`. The arm ``<norm>-b<b>`` trains each such batch as ``batch_size / b``
consecutive SGD steps of ``b`` images (:class:`~normlab.lab.experiment.TorchArm`'s ``split``), so all arms have
seen the same images after each runner step, whatever their batch size. Ghost BN is the exception, and that is
its point: ``ghost-b<b>`` takes ONE SGD step per 64 images, whose batch-norm statistics are taken over virtual
batches of ``b`` images (``BatchNorm2d(virtual_batch_size=b)``): BN's statistics over ``b`` samples, but the
gradient over 64. It separates the two things a small batch changes: noisier statistics (ghost BN has them) and a
noisier gradient with more steps (ghost BN has not). ``ghost-b64`` is plain batch norm at 64, the same network.

Learning rate: linear scaling, as the group-norm paper (Wu & He 2018, lr 0.1·B/256): ``lr · b / 32`` for an arm of
batch ``b``, with ``b`` the images per SGD step (64 for every ghost arm). SGD with momentum 0.9, as there.

Batch renorm (Ioffe 2017) starts as batch norm and relaxes its limits: the paper's schedule (rmax 1 -> 3 by step
40k, dmax 0 -> 5 by 25k, both from step 5k) scaled to this run so that rmax reaches 3 at half of training, in
images seen (runner steps), so every batch size has the same schedule per image: plain BN for the first 1/16 of
training, then rmax ramps over the next 7/16 and dmax over the next 1/4.

Evaluation uses the running statistics for the batch-type arms (eval mode), which is where small batches hurt:
those averages are taken over noisy small-batch statistics. Group, layer and instance norm compute the same
thing in training and evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab import nn as nl
from normlab.lab import data as mnist_data
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data, mean_std, ours, seed_list, unit_key
from normlab.lab.metrics import markdown_table
from normlab.lab.models import make_cnn
from normlab.lab.registry import register

NORMS = ("batch", "group", "layer", "instance", "renorm", "ghost")
NORM_LABELS = {"batch": "batch norm", "group": "group norm", "layer": "layer norm", "instance": "instance norm",
               "renorm": "batch renorm", "ghost": "ghost BN"}
REF_BATCH = 32  # the batch size at which the learning rate is --lr
BN_MOMENTUM = 0.1  # batch norm's and ghost BN's running averages (torch's default)
# Wu & He 2018 (Group Normalization), ResNet-50 on ImageNet, validation error (%) by images per GPU. Table 2 (BN,
# GN), Table 1 (LN and IN at 32 images per GPU) and batch renorm at 4 (Ioffe 2017, as quoted in their §4.1).
PUBLISHED = {
    "batch": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
    "group": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1},
    "layer": {32: 25.3},
    "instance": {32: 28.4},
    "renorm": {4: 26.3},
}
RENORM_SCHEDULE = (5_000, 35_000, 20_000, 40_000)  # the paper's warm-up, rmax ramp, dmax ramp; rmax at 3 by 40k


@dataclass
class BatchSizeConfig(RunConfig):
    """Everything that decides a batch-size run's numbers. CPU-sized: about 10 minutes on two cores."""

    steps: int = field(default=200, metadata={"help": "runner steps of --batch-size images each (every network sees "
                                                      "the same steps × batch-size images: 2 epochs of the default "
                                                      "6,400)"})
    batch_size: int = field(default=64, metadata={"help": "images per runner step: the largest per-step batch; an "
                                                          "arm of batch b takes batch-size/b SGD steps on them, ghost "
                                                          "BN one step with virtual batches of b"})
    eval_every: int = field(default=200, metadata={"help": "runner steps between evaluations (at step 0 nothing "
                                                           "is evaluated: the networks are untrained)"})
    seeds: int = field(default=3, metadata={"help": "how many seeds, from --seed on: several give mean ± std"})
    workers: int | None = field(default=None, metadata={"help": "processes the arms are spread over (default: one "
                                                                "per arm on the CPU, at most one per core)"})
    norms: tuple[str, ...] = field(default=NORMS, metadata={"help": "the normalizations", "choices": NORMS})
    batch_sizes: tuple[int, ...] = field(default=(2, 4, 8, 16, 32, 64), metadata={
        "help": "images per SGD step (ghost BN: per virtual batch); each must divide --batch-size"})
    lr: float = field(default=0.02, metadata=ours(
        f"SGD learning rate at batch {REF_BATCH}; batch b uses lr × b / {REF_BATCH} (the GN paper's linear scaling)"))
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (the GN paper's)"})
    train_images: int = field(default=6_400, metadata=ours("training images: the first this many of MNIST's"))
    test_images: int | None = field(default=None, metadata=ours(
        "test images evaluated: the first this many (default: all 10,000)"))
    cnn_channels: tuple[int, ...] = field(default=(8, 16), metadata=ours(
        "the CNN's conv widths, one 3x3 conv block and a 2x2 max-pool each"))
    groups: int = field(default=4, metadata=ours(
        "group norm's groups in every layer (the paper's 32 needs 32 channels or more); must divide the widths"))
    renorm_momentum: float = field(default=0.01, metadata=ours(
        "batch renorm's running-average momentum (normlab's BatchRenorm default; the others use 0.1)"))

    def checks(self) -> list[tuple[str, bool, str]]:
        return super().checks() + [
            ("norms", len(self.norms) >= 1 and len(set(self.norms)) == len(self.norms)
             and set(self.norms) <= set(NORMS), f"must be distinct names from {NORMS}"),
            ("batch_sizes", len(self.batch_sizes) >= 1 and len(set(self.batch_sizes)) == len(self.batch_sizes)
             and all(b >= 2 and self.batch_size % b == 0 for b in self.batch_sizes),
             f"must be distinct sizes >= 2 that divide batch_size={self.batch_size}"),
            ("lr", self.lr > 0, "must be > 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("train_images", self.train_images >= self.batch_size, f"must be >= batch_size={self.batch_size}"),
            ("test_images", self.test_images is None or self.test_images >= 1, "must be None or >= 1"),
            ("cnn_channels", len(self.cnn_channels) >= 1 and all(c >= 1 for c in self.cnn_channels),
             "must be one or more widths >= 1"),
            ("groups", self.groups >= 1 and all(c % self.groups == 0 for c in self.cnn_channels),
             f"must divide every CNN width {self.cnn_channels}"),
            ("renorm_momentum", 0 < self.renorm_momentum <= 1, "must be in (0, 1]"),
        ]


def arm_name(norm: str, batch: int) -> str:
    """``"<norm>-b<batch>"``, e.g. ``"group-b4"``."""
    return f"{norm}-b{batch}"


def parse_arm(arm: str) -> tuple[str, int]:
    """``(norm, batch)`` of an arm's name (a ``/s<seed>`` suffix is ignored)."""
    norm, _, b = arm.partition("/")[0].rpartition("-b")
    return norm, int(b)


def step_batch(norm: str, batch: int, cfg: BatchSizeConfig) -> int:
    """Images per SGD step: the arm's batch, or for ghost BN the whole runner step (its gradient's batch)."""
    return cfg.batch_size if norm == "ghost" else batch


def arm_lr(norm: str, batch: int, cfg: BatchSizeConfig) -> float:
    """The arm's learning rate: ``lr`` scaled linearly with the images per SGD step."""
    return cfg.lr * step_batch(norm, batch, cfg) / REF_BATCH


def renorm_limits(step: int, cfg: BatchSizeConfig) -> tuple[float, float]:
    """Batch renorm's ``(rmax, dmax)`` at runner ``step``: the paper's schedule scaled so that rmax reaches 3 at half
    of the run (see the module's docstring)."""
    warmup, r_ramp, d_ramp, full = RENORM_SCHEDULE
    scale = cfg.steps / 2 / full
    return nl.renorm_schedule(step, round(warmup * scale), (round(r_ramp * scale), round(d_ramp * scale)))


def network(arm: str, cfg: BatchSizeConfig) -> torch.nn.Sequential:
    """The arm's CNN; its conv weights are a function of the seed and the norm's kind alone (every batch size of a
    norm starts from the same network; batch norm, batch renorm and ghost BN from the same weights too)."""
    norm, batch = parse_arm(arm)
    options = {"virtual_batch_size": batch} if norm == "ghost" else {}
    torch.manual_seed(int(np.random.SeedSequence([cfg.seed, 2]).generate_state(1)[0]))
    net = make_cnn(cfg.cnn_channels, norm=norm, groups=cfg.groups,
                   momentum=cfg.renorm_momentum if norm == "renorm" else BN_MOMENTUM, **options)
    # channels_last: torch's CPU max-pool is several times faster on it (the numbers do not depend on it)
    return net.to(memory_format=torch.channels_last)


class BatchSizeArm(TorchArm):
    """A :class:`TorchArm` that, for batch renorm, sets the limits of :func:`renorm_limits` before each runner step."""

    def __init__(self, *args, cfg: BatchSizeConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.cfg, self.renorm = cfg, parse_arm(self.name)[0] == "renorm"

    def train(self, start: int, end: int) -> float:
        if not self.renorm:
            return super().train(start, end)
        losses = []
        for step in range(start, end):
            nl.set_renorm_limits(self.net, *renorm_limits(step, self.cfg))
            losses.append(super().train(step, step + 1))
        return float(np.mean(losses)) if losses else 0.0


class _Measure:
    """Test loss and accuracy on the first ``test_images`` test images, in eval mode (batch-type norms use their
    running statistics); nothing at step 0 (an untrained network)."""

    def __init__(self, test_images: int | None):
        self.n = test_images

    def __call__(self, arm: TorchArm) -> dict:
        if arm.step == 0:
            return {"test_loss": None, "test_acc": None}
        x, y = arm.data.test_x[:self.n], arm.data.test_y[:self.n]
        logits = arm.net(x)
        return {"test_loss": torch.nn.functional.cross_entropy(logits, y).item(),
                "test_acc": (logits.argmax(dim=1) == y).double().mean().item()}


@register
class BatchSize(Experiment):
    name = "batch-size"
    title = "when the batch is small: batch, group, layer, instance norm, batch renorm and ghost BN by batch size"
    config = BatchSizeConfig
    # 80 images (one epoch) in runner steps of 8, at batch 2 and 8, on 500 test images: a demo of the protocol
    quick = {"steps": 10, "eval_every": 5, "seeds": 2, "batch_size": 8, "batch_sizes": (2, 8), "train_images": 80,
             "test_images": 500}
    figure_name = "batch_size.png"
    paper = ("Wu & He 2018, Group Normalization, Tables 1-2 (ResNet-50, ImageNet, by images per GPU); batch renorm "
             "at 4 images per GPU: Ioffe 2017, as quoted there")
    our_choices = ("lr", "steps", "train_images", "test_images", "cnn_channels", "groups", "renorm_momentum",
                   "eval_every")
    # not steps: the batch-renorm schedule is scaled to the run's length
    resumable_changes = ("data_dir", "workers", "eval_every")
    order = 50

    def arms(self, cfg):
        # batch-major: the workers take arms in turn, so each gets a share of the costly small batches
        return tuple(arm_name(n, b) for b in cfg.batch_sizes for n in cfg.norms)

    def label(self, arm):
        norm, batch = parse_arm(arm)
        seed = arm.partition("/")[2]
        return f"{NORM_LABELS[norm]} b={batch}" + (f" {seed}" if seed else "")

    def build_arm(self, arm, cfg, ds, device):
        norm, batch = parse_arm(arm)
        if cfg.train_images > len(ds.train_labels):
            raise ValueError(f"train_images must be at most the {len(ds.train_labels):,} training images, got "
                             f"{cfg.train_images:,}")
        data = device_data(ds, device, image=True, train_limit=cfg.train_images)
        order = mnist_data.DataOrder(cfg.train_images, cfg.batch_size, cfg.seed)
        lr, momentum = arm_lr(norm, batch, cfg), cfg.momentum
        return BatchSizeArm(arm, network(arm, cfg), data, order, cfg.seed, device,
                            optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
                            measure=_Measure(cfg.test_images), split=cfg.batch_size // step_batch(norm, batch, cfg),
                            cfg=cfg)

    def summarize(self, cfg, records):
        return summarize(records, cfg)

    def table(self, summary, meta):
        return format_table(summary)

    def plot(self, records, meta):
        return plot_errors(records, meta)


# ---------------------------------------------------------------------------------------------------------------
# summary


def _errors(records: list[dict], cfg: BatchSizeConfig, norm: str, batch: int) -> list[float]:
    last = records[-1]
    return [100.0 * (1.0 - last[unit_key(arm_name(norm, batch), s, cfg)]["test_acc"]) for s in seed_list(cfg)]


def summarize(records: list[dict], cfg: BatchSizeConfig) -> dict:
    """Test error (%) at the last step per norm and batch size (mean, std over seeds), each norm's change from the
    largest to the smallest batch and batch norm minus group norm per batch size (paired by seed)."""
    sizes = sorted(cfg.batch_sizes, reverse=True)
    out = {"final_step": records[-1]["step"], "seeds": seed_list(cfg), "norms": list(cfg.norms),
           "batch_sizes": sizes, "epochs": cfg.steps * cfg.batch_size / cfg.train_images,
           "images_seen": cfg.steps * cfg.batch_size, "error": {}, "sgd_steps": {}, "lr": {}, "change": {},
           "bn_minus_gn": {}}
    for norm in cfg.norms:
        out["error"][norm] = {str(b): mean_std(_errors(records, cfg, norm, b)) for b in sizes}
        out["sgd_steps"][norm] = {str(b): cfg.steps * cfg.batch_size // step_batch(norm, b, cfg) for b in sizes}
        out["lr"][norm] = {str(b): arm_lr(norm, b, cfg) for b in sizes}
        big, small = _errors(records, cfg, norm, sizes[0]), _errors(records, cfg, norm, sizes[-1])
        out["change"][norm] = mean_std([s - b for s, b in zip(small, big)])
    if {"batch", "group"} <= set(cfg.norms):
        out["bn_minus_gn"] = {str(b): mean_std([x - y for x, y in zip(_errors(records, cfg, "batch", b),
                                                                     _errors(records, cfg, "group", b))])
                              for b in sizes}
    return out


# ---------------------------------------------------------------------------------------------------------------
# table


def _ms(m_s, digits: int = 2, signed: bool = False) -> str:
    mean, std = m_s
    if mean is None:
        return "-"
    return f"{mean:{'+' if signed else ''}.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def _clear(m_s, n: int) -> bool:
    """A paired difference clear of the seeds' noise: |mean| > 2 std / √n (never with one seed)."""
    mean, std = m_s
    return n > 1 and mean is not None and abs(mean) > 2 * std / math.sqrt(n)


NOTES = """\
*Ours*: test error (%) of the small CNN (conv widths {channels}, 3x3, ReLU, max-pool) on {test} MNIST test images
after {images:,} training images ({epochs:g} epoch(s) of the first {train:,}), mean ± std over {n} seed(s); every
network saw the same images in the same order. Columns are images per SGD step (b); the learning rate is
{lr} × b / {ref} with momentum {momentum}, so b = {small} takes {steps_small:,} SGD steps and b = {big} takes
{steps_big:,}. Batch norm, batch renorm and ghost BN are evaluated with their running statistics (momentum
{bn_momentum}; batch renorm {renorm_momentum}). Group norm has {groups} groups per layer. *Ghost BN*: {big} images
per SGD step (gradient and learning rate of b = {big}) with batch-norm statistics over virtual batches of b images:
the noise of small-batch statistics without the small-batch gradient; at b = {big} it is batch norm itself.

*Wu & He*: ResNet-50 on ImageNet, validation error (%) by images per GPU (Group Normalization, 2018: Table 2 for
BN and GN; Table 1 for LN and IN at 32; batch renorm at 4 from Ioffe 2017 as quoted in their §4.1). Their BN loses
11.1 points from 32 to 2 images per GPU while GN stays within 0.2; batch renorm recovers 1.0 of BN's 3.7 at 4.
MNIST is not ImageNet, nor our CNN a ResNet: compare the shapes of the rows, not the values.
"""


def agreement(summary: dict) -> list[str]:
    """One sentence per published claim: does ours show it?"""
    n, sizes = len(summary["seeds"]), summary["batch_sizes"]
    big, small = sizes[0], sizes[-1]
    lines = []
    change = summary["change"]
    for norm, claim in (("batch", "rises (theirs: +11.1 from 32 to 2)"), ("group", "stays flat (theirs: 24.0-24.2)"),
                        ("layer", "stays flat (batch-independent)"), ("instance", "stays flat (batch-independent)"),
                        ("renorm", "rises less than batch norm's (theirs: 26.3 vs 27.3 at 4)"),
                        ("ghost", "rises like batch norm's if the statistics' noise is what hurts")):
        if norm not in change:
            continue
        m_s = change[norm]
        word = ("rises" if m_s[0] > 0 else "falls") if _clear(m_s, n) else "does not change beyond the seeds' noise"
        lines.append(f"- {NORM_LABELS[norm]}: from b = {big} to b = {small} the error {word} "
                     f"({_ms(m_s, signed=True)} points); expected: it {claim}.")
    if "batch" in change and "renorm" in change:
        diff = (change["renorm"][0] - change["batch"][0]) if change["batch"][0] is not None else None
        if diff is not None:
            lines.append(f"- batch renorm's rise minus batch norm's: {diff:+.2f} points "
                         f"({'smaller' if diff < 0 else 'not smaller'}, as the mean over seeds).")
    return lines


def format_table(summary: dict) -> str:
    """Ours beside Wu & He's Table 2: rows are normalizations, columns images per SGD step (theirs: per GPU)."""
    sizes, n = summary["batch_sizes"], len(summary["seeds"])
    rows = [(f"ours: {NORM_LABELS[norm]}", *(_ms(summary["error"][norm][str(b)]) for b in sizes),
             _ms(summary["change"][norm], signed=True)) for norm in summary["norms"]]
    if summary["bn_minus_gn"]:
        rows.append(("ours: BN − GN", *(_ms(summary["bn_minus_gn"][str(b)], signed=True) for b in sizes), ""))
    for norm, pub in PUBLISHED.items():
        if set(pub) & set(sizes):  # a row with nothing in our columns says nothing
            rows.append((f"Wu & He: {NORM_LABELS[norm]}", *(f"{pub[b]:.1f}" if b in pub else "" for b in sizes), ""))
    rows.append(("Wu & He: BN − GN", *(f"{PUBLISHED['batch'][b] - PUBLISHED['group'][b]:+.1f}"
                                       if b in PUBLISHED["batch"] else "" for b in sizes), ""))
    header = ("test error (%)", *(f"b = {b}" for b in sizes), f"b={sizes[-1]} − b={sizes[0]}")
    cfg = summary.get("config", {})
    big = cfg.get("batch_size", sizes[0])
    n_test = summary.get("data", {}).get("test", 10_000)
    notes = NOTES.format(
        channels="-".join(str(c) for c in cfg.get("cnn_channels", ())),
        test=f"{min(cfg.get('test_images') or n_test, n_test):,}",
        images=summary["images_seen"], epochs=round(summary["epochs"], 3), train=cfg.get("train_images", 0), n=n,
        lr=cfg.get("lr"), ref=REF_BATCH, momentum=cfg.get("momentum"), big=big,
        small=sizes[-1], bn_momentum=BN_MOMENTUM, steps_small=summary["images_seen"] // sizes[-1],
        steps_big=summary["images_seen"] // big,
        renorm_momentum=cfg.get("renorm_momentum"), groups=cfg.get("groups"))
    return "\n".join([markdown_table(header, rows), "", notes, *agreement(summary)]).rstrip()


# ---------------------------------------------------------------------------------------------------------------
# the figure

STYLE = {"batch": ("tab:blue", "o", "-"), "group": ("tab:orange", "s", "-"), "layer": ("tab:green", "^", "-"),
         "instance": ("tab:red", "v", "-"), "renorm": ("tab:purple", "D", "--"), "ghost": ("tab:brown", "x", "--")}


def plot_errors(records: list[dict], meta: dict):
    """Test error against batch size (log2 axis), one line per normalization, mean ± std over seeds; beside it Wu &
    He's ImageNet numbers for context. Returns the matplotlib Figure."""
    from normlab.lab.plots import pyplot, run_note

    plt = pyplot()
    cfg = BatchSizeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    sizes = sorted(cfg.batch_sizes)
    fig, (ax, ax_pub) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for norm in cfg.norms:
        err = np.array([_errors(records, cfg, norm, b) for b in sizes])
        std = err.std(axis=1, ddof=1) if err.shape[1] > 1 else np.zeros(len(sizes))
        color, marker, ls = STYLE[norm]
        ax.errorbar(sizes, err.mean(axis=1), yerr=std, color=color, marker=marker, ls=ls, capsize=3,
                    label=NORM_LABELS[norm])
    for a in (ax, ax_pub):
        a.set_xscale("log", base=2)
        a.invert_xaxis()  # as the paper's Figure 5: the batch shrinks to the right
        a.grid(alpha=0.3)
        a.set_xlabel("images per SGD step" if a is ax else "images per GPU")
        a.set_ylabel("test error (%)" if a is ax else "ImageNet val error (%)")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_title(f"ours: small CNN on MNIST, {cfg.steps * cfg.batch_size:,} images seen, {cfg.seeds} seed(s)",
                 fontsize=9)
    ax.legend(fontsize=8)
    for norm, pub in PUBLISHED.items():
        color, marker, ls = STYLE[norm]
        bs = sorted(pub)
        ax_pub.plot(bs, [pub[b] for b in bs], marker=marker, color=color, ls=ls if len(bs) > 1 else "none",
                    label=NORM_LABELS[norm])
    ax_pub.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
    ax_pub.set_title("Wu & He 2018: ResNet-50, ImageNet (context)", fontsize=9)
    ax_pub.legend(fontsize=8)
    note = (f"SGD lr {cfg.lr} × b/{REF_BATCH}, momentum {cfg.momentum}; ghost BN: {cfg.batch_size} images per step, "
            "statistics over virtual batches of b; eval with running statistics")
    extra = run_note(meta)
    fig.suptitle(f"Test error vs batch size. {note}" + (f"\n{extra}" if extra else ""), fontsize=9)
    fig.tight_layout()
    return fig
