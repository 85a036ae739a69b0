"""How an experiment is defined: a config dataclass and an :class:`Experiment` subclass, in one small file.

An experiment file in :mod:`normlab.lab.experiments` holds:

- a config dataclass subclassing :class:`RunConfig` (the fields every experiment has: steps, batch size,
  evaluation interval, seeds, device, data, threads, workers), with its own fields, each with
  ``metadata={"help": ...}`` (and ``"choices"``) so that its ``normlab NAME --field-name`` flag is generated, and
  ``checks()`` extended with its own range checks (``validate()`` raises on the first that fails);
- an :class:`Experiment` subclass decorated with :func:`normlab.lab.registry.register`, which names the config,
  the ``--quick`` overrides, and implements the hooks: :meth:`~Experiment.arms` (the named networks trained side by
  side on the same batches), :meth:`~Experiment.build_arm` (one of them, usually a :class:`TorchArm` whose
  ``measure`` says what is recorded at each evaluation), :meth:`~Experiment.summarize`, :meth:`~Experiment.table`
  (the published numbers beside ours) and :meth:`~Experiment.plot`.

The runner (:func:`normlab.lab.runner.run`) does the rest: the run folder, workers, resume, progress, Ctrl-C.
With ``seeds=n > 1`` every arm is trained once per seed ``seed, seed+1, ...``; its records are keyed
``"<arm>/s<seed>"`` (:func:`unit_key`), and :func:`seed_values` / :func:`mean_std` gather them for the summary.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from normlab.lab import data as mnist_data


def _help(text: str, **more) -> dict:
    return {"help": text, **more}


def ours(text: str, **more) -> dict:
    """A config field's metadata for a choice the paper does not make: its help says so."""
    return _help(f"{text} (normlab's choice: the paper gives none)", **more)


@dataclass
class RunConfig:
    """The fields every experiment has. A subclass adds its own and may redeclare a default."""

    steps: int = field(default=10_000, metadata=_help("training steps"))
    batch_size: int = field(default=60, metadata=_help("mini-batch size"))
    eval_every: int = field(default=500, metadata=_help("steps between evaluations"))
    seed: int = field(default=0, metadata=_help("seed of the weights and the data order (the first seed)"))
    seeds: int = field(default=1, metadata=_help("how many seeds, from --seed on: several give mean ± std"))
    device: str = field(default="auto", metadata=_help("cpu, cuda, cuda:N or auto (cuda if available, else cpu)"))
    data_dir: str | None = field(default=None, metadata=_help(
        "folder of the MNIST files (default: $NORMLAB_DATA, else ~/.cache/normlab/mnist); must exist"))
    threads: int | None = field(default=1, metadata=_help("torch CPU threads per process"))
    workers: int | None = field(default=None, metadata=_help(
        "processes the arms are spread over (default: one per arm on the CPU, at most one per core; 1 on a GPU)"))

    def checks(self) -> list[tuple[str, bool, str]]:
        """``(field, ok, rule)`` for every range check; a subclass returns ``super().checks() + [...]``."""
        return [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 2, "must be >= 2 (batch norm needs two samples)"),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("seeds", self.seeds >= 1, "must be >= 1"),
            ("threads", self.threads is None or self.threads >= 1, "must be None or >= 1"),
            ("workers", self.workers is None or self.workers >= 1, "must be None or >= 1"),
        ]

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its allowed range."""
        for name, ok, rule in self.checks():
            if not ok:
                raise ValueError(f"{name} {rule}, got {name}={getattr(self, name)!r}")


class Arm(Protocol):
    """One network of an experiment, as the runner drives it (in this process or in a worker)."""

    def train(self, start: int, end: int) -> float:
        """Train steps ``start`` to ``end - 1`` (0-based); return their mean loss."""

    def evaluate(self) -> dict:
        """What is recorded at an evaluation: a flat dict of JSON numbers (or None)."""

    def state_dict(self) -> dict:
        """Everything to resume from (CPU tensors and plain values: saved with ``torch.save``)."""

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave."""


class Experiment:
    """One experiment: what the runner, ``normlab NAME`` and ``normlab plot`` need to know. Subclass, set the class
    attributes, implement the hooks, and decorate with :func:`normlab.lab.registry.register`."""

    name: ClassVar[str]                     # the subcommand: normlab NAME
    title: ClassVar[str]                    # one line: --help, table.md's heading
    config: ClassVar[type[RunConfig]]       # the config dataclass
    quick: ClassVar[dict[str, Any]] = {}    # --quick: field overrides, well under a minute on two CPU cores
    figure_name: ClassVar[str] = "figure.png"
    paper: ClassVar[str] = ""               # what is reproduced, recorded in config.json
    our_choices: ClassVar[tuple[str, ...]] = ()  # config fields the paper does not give, recorded in config.json
    # config fields a --resume may change: they do not alter the numbers
    resumable_changes: ClassVar[tuple[str, ...]] = ("steps", "data_dir", "workers")
    order: ClassVar[int] = 100              # position in normlab --help

    def arms(self, cfg: RunConfig) -> tuple[str, ...]:
        """The arms' names, in order (the records' keys)."""
        raise NotImplementedError

    def label(self, arm: str) -> str:
        """An arm's name for people (progress bar, legends)."""
        return arm

    def load_data(self, cfg: RunConfig, log: Callable[[str], None]) -> mnist_data.MNIST:
        """The data set, loaded once in the main process and sent to the workers: MNIST by default."""
        return mnist_data.load_mnist(cfg.data_dir, log=log)

    def build_arm(self, arm: str, cfg: RunConfig, ds: mnist_data.MNIST, device: str) -> Arm:
        """Arm ``arm`` at its initial state; ``cfg.seed`` is this arm's seed (one per seed when ``seeds > 1``)."""
        raise NotImplementedError

    def summarize(self, cfg: RunConfig, records: list[dict]) -> dict:
        """The headline numbers from the metrics records (JSON-able; goes into summary.json)."""
        raise NotImplementedError

    def table(self, summary: dict, meta: dict) -> str:
        """The Markdown table of ours beside the published numbers, with the notes that explain its rows."""
        raise NotImplementedError

    def plot(self, records: list[dict], meta: dict):
        """The figure (a matplotlib Figure) from the records and config.json's ``meta``; the caller saves it."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------
# seeds


def seed_list(cfg: RunConfig) -> list[int]:
    """The seeds of a run: ``seed, seed + 1, ..., seed + seeds - 1``."""
    return [cfg.seed + i for i in range(cfg.seeds)]


def unit_key(arm: str, seed: int, cfg: RunConfig) -> str:
    """The records' key of ``arm`` trained with ``seed``: the arm's name alone when the run has one seed."""
    return arm if cfg.seeds == 1 else f"{arm}/s{seed}"


def units(exp: Experiment, cfg: RunConfig) -> list[tuple[str, str, int]]:
    """``(key, arm, seed)`` of every network the run trains, seed-major."""
    return [(unit_key(a, s, cfg), a, s) for s in seed_list(cfg) for a in exp.arms(cfg)]


def seed_values(record: dict, arm: str, metric: str, cfg: RunConfig) -> list:
    """``metric`` of ``arm`` in one metrics record, one value per seed."""
    return [record[unit_key(arm, s, cfg)][metric] for s in seed_list(cfg)]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for one value) of ``values``; (None, None) when any is None (e.g. never reached)."""
    if not values or any(v is None for v in values):
        return None, None
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# the torch arm: a classifier trained by SGD on data that live on the device


@dataclass
class DeviceData:
    """Network inputs as tensors on one device: float32 ``train_x``/``test_x`` and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


_DEVICE_DATA: dict[tuple, tuple[mnist_data.MNIST, DeviceData]] = {}


def device_data(ds: mnist_data.MNIST, device: str, standardize: bool = False, image: bool = False,
                train_limit: int | None = None) -> DeviceData:
    """``ds``'s network inputs on ``device``, shared by the arms of one process (one copy, not one per arm).

    ``image``: ``(N, 1, 28, 28)`` for a CNN instead of ``(N, 784)``; ``train_limit``: the first that many training
    images only (a reduced training set).
    """
    key = (id(ds), device, standardize, image, train_limit)
    if key not in _DEVICE_DATA:
        inputs = mnist_data.prepare_inputs(ds, standardize)
        n = len(inputs.train_x) if train_limit is None else train_limit
        shape = (-1, 1, 28, 28) if image else (-1, inputs.train_x.shape[1])
        dev = torch.device(device)
        _DEVICE_DATA[key] = (ds, DeviceData(  # ds is kept alive so that its id is not reused
            torch.from_numpy(inputs.train_x[:n]).reshape(shape).to(dev),
            torch.from_numpy(inputs.train_y[:n].astype(np.int64)).to(dev),
            torch.from_numpy(inputs.test_x).reshape(shape).to(dev),
            torch.from_numpy(inputs.test_y.astype(np.int64)).to(dev)))
    return _DEVICE_DATA[key][1]


def release_device_data() -> None:
    """Drop the tensors :func:`device_data` keeps (the runner calls it when a run's arms in this process end)."""
    _DEVICE_DATA.clear()


def eval_metrics(arm: TorchArm) -> dict:
    """The default measure: ``test_loss`` and ``test_acc`` over the whole test set in one batch (eval mode)."""
    logits = arm.net(arm.data.test_x)
    return {
        "test_loss": torch.nn.functional.cross_entropy(logits, arm.data.test_y).item(),
        "test_acc": (logits.argmax(dim=1) == arm.data.test_y).double().mean().item(),
    }


@functools.cache
def _arm_hash(name: str) -> int:
    return zlib.crc32(name.encode())


class TorchArm:
    """A torch classifier trained with cross-entropy on the batches of ``order``, evaluated by ``measure``.

    The data live on the device and mini-batches are gathered by index: no DataLoader, no copies. Before each
    training segment the global torch RNG (dropout's) is seeded from ``(seed, name, start)``, so an arm's numbers
    do not depend on which other arms share its process, and a resumed run draws what an uninterrupted one did.

    Args:
        name: the arm's name (seeds its RNG).
        net: the network; moved to ``device``.
        data: :func:`device_data`.
        order: the :class:`normlab.lab.data.DataOrder` all arms follow.
        seed: the run's seed for this arm.
        lr: SGD's learning rate (plain SGD), unless ``optimizer`` is given.
        optimizer: ``optimizer(parameters)`` builds another optimizer.
        measure: ``measure(arm) -> dict``, run in eval mode under ``torch.no_grad()`` at each evaluation
            (default :func:`eval_metrics`); ``arm.step`` is the step the arm has trained to (0 before training),
            so a measure can tell the first evaluation from the last.
        split: each step's batch of ``order`` is trained as ``split`` consecutive SGD steps of
            ``order.batch_size // split`` rows (the same images in smaller batches; it must divide the batch).
    """

    def __init__(self, name: str, net: torch.nn.Module, data: DeviceData, order: mnist_data.DataOrder, seed: int,
                 device: str, lr: float = 0.1, optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                 measure: Callable[[TorchArm], dict] = eval_metrics, split: int = 1):
        if split < 1 or order.batch_size % split:
            raise ValueError(f"split must be >= 1 and divide the order's batch size {order.batch_size}, got {split}")
        self.name, self.seed, self.device, self.split = name, seed, torch.device(device), split
        self.net = net.to(self.device)
        self.opt = optimizer(self.net.parameters()) if optimizer else torch.optim.SGD(self.net.parameters(), lr=lr)
        self.data, self.order, self.measure = data, order, measure
        self.step = 0

    def train(self, start: int, end: int) -> float:
        """Steps ``start`` to ``end - 1`` (0-based) on the batches of ``order`` (``split`` SGD steps each); returns
        the mean loss of their SGD steps."""
        torch.manual_seed(int(np.random.SeedSequence([self.seed, _arm_hash(self.name), start]).generate_state(1)[0]))
        rows = torch.from_numpy(self.order.segment(start, end)).to(self.device)  # (steps, B), one transfer
        rows = rows.reshape(-1, rows.shape[1] // self.split)  # consecutive rows of one batch: one SGD step each
        total = torch.zeros((), device=self.device)
        x, y = self.data.train_x, self.data.train_y
        for i in range(len(rows)):
            # index_select: a copy of whole rows (x[rows[i]], advanced indexing, took 3x as long on the CPU)
            loss = torch.nn.functional.cross_entropy(self.net(x.index_select(0, rows[i])), y.index_select(0, rows[i]))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()  # summed on the device: no .item() per step, which would wait for the GPU
        self.step = end
        return total.item() / max(len(rows), 1)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """``measure(self)`` with the network in eval mode (BN uses its running statistics)."""
        self.net.eval()
        try:
            return self.measure(self)
        finally:
            self.net.train()

    def state_dict(self) -> dict:
        """The network's and the optimizer's state (tensors on the CPU)."""
        net = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {"net": net, "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names pass through checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {device!r} ({e})") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device

