"""The MNIST experiment of Ioffe & Szegedy 2015, §4.1 (Figure 1), read top to bottom.

Two 784-100-100-100-10 sigmoid networks, one without and one with batch norm before each sigmoid, start from
the same weights and see the same mini-batches in the same order. Every ``eval_every`` steps both are evaluated
on the whole test set (the BN network in eval mode, with its running statistics), and the 15th/50th/85th
percentiles of one last-hidden-layer sigmoid's input over the test images are recorded.

The paper gives no optimizer, learning rate or initial weight scale; the defaults of :class:`MnistConfig` are
normlab's choices and are written into every run's ``config.json``.

A run folder holds::

    config.json      the resolved configuration (with the data source and versions)
    metrics.jsonl    one record per evaluation (see normlab.lab.diagnostics)
    summary.json     headline numbers: accuracy at 5k/10k/20k/50k steps, steps to 95%/97%, percentile drift
    figure1.png      the paper's three panels, drawn from metrics.jsonl
    checkpoint.pt    both networks' state at the last evaluation, for --resume

Each file is replaced atomically and fsynced (:func:`normlab.lab.files.atomic_write`), so an interrupted run, even
by a power cut, leaves the previous complete version, never a torn one.

Resuming: the checkpoint is written at each evaluation, right after that evaluation's metrics record, and at no
other time (not on Ctrl-C either: a network interrupted mid-step has no consistent state to save). ``--resume``
continues from the last checkpoint's step; the metrics records after that step, if any, are dropped, and the steps
since that evaluation, at most ``eval_every``, are trained again. Since the data order is a pure function of
``(seed, step)`` and the networks' and optimizer's states are restored exactly, the resumed run writes metrics
byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normlab.lab import data as mnist_data
from normlab.lab import files
from normlab.lab.diagnostics import LABELS, format_table, sigmoid_input_percentiles, summarize
from normlab.lab.models import MLP, VARIANTS, init_weights

ENGINES = ("torch", "numpy")


@dataclass
class MnistConfig:
    """Everything that decides a run's numbers. ``lr``, ``init_std`` and ``optimizer`` are normlab's choices."""

    steps: int = 50_000
    batch_size: int = 60
    lr: float = 0.5                 # ours: the paper gives none
    init_std: float = 0.01          # ours: "small random Gaussian values", std not given
    optimizer: str = "sgd"          # ours: plain SGD, no momentum, no weight decay, constant learning rate
    bn_momentum: float = 0.1        # torch's default for the running statistics
    bn_eps: float = 1e-5
    eval_every: int = 500
    seed: int = 0
    device: str = "auto"            # "auto": cuda if available, else cpu
    engine: str = "torch"
    standardize: bool = False       # per-pixel mean/std of the training set, instead of pixels / 255
    data_dir: str | None = None
    probe_unit: int = 0             # which last-hidden-layer sigmoid Figure 1(b, c) follows
    threads: int | None = 1         # torch CPU threads per network: one is fastest for batches of 60
    workers: int | None = None      # processes: None = one per network on a CPU with 2+ cores, else 1

    def validate(self) -> None:
        """Raise ValueError naming the first field outside its allowed range."""
        checks = [
            ("steps", self.steps >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 2, "must be >= 2 (batch norm needs two samples)"),
            ("lr", self.lr > 0, "must be > 0"),
            ("init_std", self.init_std > 0, "must be > 0"),
            ("eval_every", self.eval_every >= 1, "must be >= 1"),
            ("engine", self.engine in ENGINES, f"must be one of {ENGINES}"),
            ("optimizer", self.optimizer == "sgd", "must be 'sgd'"),
            ("probe_unit", 0 <= self.probe_unit < 100, "must be in [0, 100)"),
            ("bn_momentum", 0 < self.bn_momentum <= 1, "must be in (0, 1]"),
            ("threads", self.threads is None or self.threads >= 1, "must be None or >= 1"),
            ("workers", self.workers in (None, 1, 2), "must be None, 1 or 2"),
        ]
        for field, ok, rule in checks:
            if not ok:
                raise ValueError(f"{field} {rule}, got {field}={getattr(self, field)!r}")


# Fields a resumed run may change: they do not alter the numbers (steps only extends the run; the workers run the
# same computation as one process does).
RESUMABLE_CHANGES = ("steps", "data_dir", "workers")


def resolve_device(device: str) -> str:
    """``"auto"`` becomes ``"cuda"`` when a GPU is visible, else ``"cpu"``; other names pass through checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    torch.device(device)  # raises on a malformed name
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


# ---------------------------------------------------------------------------------------------------------------
# the torch engine: one network per TorchNet. The NumPy engine's NumpyNet has the same four methods.


class TorchNet:
    """One network of the experiment (``variant`` ``"plain"`` or ``"bn"``) with its data, SGD and evaluation.

    The data live on the device as tensors and mini-batches are gathered by index: no DataLoader, no copies.

    Args:
        variant: ``"plain"`` or ``"bn"``.
        weights: the shared initial weights from :func:`normlab.lab.models.init_weights`.
        inputs: :class:`normlab.lab.data.Inputs`, float32.
        order: the :class:`normlab.lab.data.DataOrder` both networks follow.
        lr, momentum, eps, probe_unit: see :class:`MnistConfig`.
        device: a torch device name.
    """

    def __init__(self, variant, weights, inputs, order, lr, momentum, eps, probe_unit, device):
        self.device = torch.device(device)
        self.net = MLP(weights, bn=(variant == "bn"), momentum=momentum, eps=eps).to(self.device)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=lr)
        self.train_x = torch.from_numpy(inputs.train_x).to(self.device)
        self.train_y = torch.from_numpy(inputs.train_y.astype(np.int64)).to(self.device)
        self.test_x = torch.from_numpy(inputs.test_x).to(self.device)
        self.test_y = torch.from_numpy(inputs.test_y.astype(np.int64)).to(self.device)
        self.order, self.probe_unit = order, probe_unit

    def train(self, start: int, end: int) -> float:
        """SGD steps ``start`` to ``end - 1`` (0-based) on the batches of ``order``; returns their mean loss."""
        rows = torch.from_numpy(self.order.segment(start, end)).to(self.device)  # (steps, B), one transfer
        total = torch.zeros((), device=self.device)
        for i in range(end - start):
            loss = torch.nn.functional.cross_entropy(self.net(self.train_x[rows[i]]), self.train_y[rows[i]])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.detach()  # summed on the device: no .item() per step, which would wait for the GPU
        return total.item() / max(end - start, 1)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test loss, accuracy and the probe unit's sigmoid-input percentiles, all 10k test images in one batch."""
        self.net.eval()  # BN uses its running statistics
        logits, pre = self.net(self.test_x, probe=True)
        self.net.train()
        return {
            "test_loss": torch.nn.functional.cross_entropy(logits, self.test_y).item(),
            "test_acc": (logits.argmax(dim=1) == self.test_y).double().mean().item(),
            **sigmoid_input_percentiles(pre[:, self.probe_unit].double().cpu().numpy()),
        }

    def state_dict(self) -> dict:
        """The network's and the optimizer's state (tensors on the CPU)."""
        net = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        return {"net": net, "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


def build_net(variant: str, cfg: MnistConfig, ds: mnist_data.MNIST, device: str):
    """The ``variant`` network of ``cfg``'s engine on data set ``ds``, at its initial state."""
    inputs = mnist_data.prepare_inputs(ds, cfg.standardize)
    order = mnist_data.DataOrder(len(inputs.train_x), cfg.batch_size, cfg.seed)
    args = (variant, init_weights(cfg.seed, cfg.init_std), inputs, order, cfg.lr, cfg.bn_momentum, cfg.bn_eps,
            cfg.probe_unit)
    if cfg.engine == "numpy":
        from normlab.lab.numpy_engine import NumpyNet

        return NumpyNet(*args)
    return TorchNet(*args, device=device)


# ---------------------------------------------------------------------------------------------------------------
# running the two networks: in this process one after the other, or each in a worker process of its own. The two
# never exchange anything but the step numbers, so on two CPU cores the workers halve the time and give the same
# numbers (each does exactly the sequential computation, with the same thread count).


class Local:
    """A network in this process, behind the worker interface: ``send(method, *args)``, then ``recv()``."""

    def __init__(self, net):
        self.net, self._result = net, None

    def send(self, method: str, *args) -> None:
        self._result = getattr(self.net, method)(*args)

    def recv(self):
        return self._result

    def close(self) -> None:
        pass


def _worker(conn, variant, cfg, ds, device) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        net = build_net(variant, cfg, ds, device)
        while (msg := conn.recv()) is not None:
            if msg[0] == "cpu_seconds":  # this process's CPU time: what the run costs on an idle core
                conn.send(("ok", time.process_time()))
                continue
            conn.send(("ok", getattr(net, msg[0])(*msg[1:])))
    except EOFError:  # the parent is gone
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))


_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class Worker:
    """A network in a worker process (spawned: a forked torch can hang), with :class:`Local`'s interface."""

    def __init__(self, variant, cfg, ds, device):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, variant, cfg, ds, device), daemon=True)
        # BLAS libraries read their thread count once, at load: the child inherits it from our environment. Two
        # workers with a BLAS pool each on two cores would fight (NumPy's matmuls ran 3x slower so).
        saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
        if cfg.threads is not None:
            os.environ.update(dict.fromkeys(_BLAS_THREAD_VARS, str(cfg.threads)))
        try:
            self.proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()

    def send(self, method: str, *args) -> None:
        self.conn.send((method, *args))

    def recv(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"a training worker died (exit code {self.proc.exitcode})") from None
        if status == "error":
            raise RuntimeError(f"a training worker failed:\n{value}")
        return value

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=1)  # a worker still busy (after Ctrl-C or an error) is stopped: its state is not needed
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        self.conn.close()


def call_all(nets: dict, method: str, *args) -> dict:
    """Call ``method`` on every network (concurrently when they are workers); returns ``{variant: result}``."""
    for net in nets.values():
        net.send(method, *args)
    return {v: net.recv() for v, net in nets.items()}


def resolve_workers(cfg: MnistConfig, device: str) -> int:
    """Processes to train in: ``cfg.workers``, or by default 2 on a CPU with at least 2 cores, else 1."""
    if cfg.workers is not None:
        return cfg.workers
    return 2 if device == "cpu" and (os.cpu_count() or 1) >= 2 else 1


# ---------------------------------------------------------------------------------------------------------------
# small file helpers: every write goes through normlab.lab.files.atomic_write.


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half of one."""
    files.write_text(path, text)


def save_atomic(path: Path, obj) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically, so a crash never leaves a torn checkpoint."""
    files.atomic_write(path, lambda f: torch.save(obj, f))


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def default_out(cfg: MnistConfig) -> Path:
    """A fresh run folder under ``./runs``: ``runs/mnist-<engine>-s<seed>-<time>``."""
    return Path("runs") / f"mnist-{cfg.engine}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resumable(saved: dict, cfg: dict, run_dir: Path) -> None:
    diff = {k: (saved.get(k), cfg[k]) for k in cfg if k not in RESUMABLE_CHANGES and saved.get(k) != cfg[k]}
    if diff:
        detail = ", ".join(f"{k}: run has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {run_dir} with a different configuration ({detail})")


# ---------------------------------------------------------------------------------------------------------------
# the run


def run(cfg: MnistConfig, out: str | os.PathLike | None = None, resume: bool = False, progress: bool | None = None,
        on_eval: Callable[[dict], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train both networks by ``cfg``, write the run folder ``out``, and return the summary.

    Args:
        cfg: the configuration; ``device="auto"`` and ``workers=None`` are resolved and recorded.
        out: the run folder (default: a new one under ``./runs``). Must not hold a run unless ``resume``.
        resume: continue the run in ``out`` from its checkpoint, the state at its last evaluation (the steps
            trained since are trained again; see the module's docstring). The configuration must match the saved
            one except for :data:`RESUMABLE_CHANGES`. A run folder without a checkpoint starts again from step 0.
            Nothing in the folder is written before the checkpoint and the metrics are checked.
        progress: show a progress bar (default: when stderr is a terminal).
        on_eval: called with each new metrics record, after it and the checkpoint are written.
        log: where messages go (default: stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg.validate()
    device = resolve_device(cfg.device)
    run_dir = Path(out) if out is not None else default_out(cfg)
    config_path, metrics_path, ckpt_path = run_dir / "config.json", run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    if resume and not config_path.is_file():
        raise FileNotFoundError(f"cannot resume: {config_path} does not exist")
    if not resume and metrics_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")

    # -- data, and the resolved configuration (checked against the saved one when resuming)
    ds = mnist_data.load_mnist(cfg.data_dir, log=log)
    resolved = {**dataclasses.asdict(cfg), "device": device, "workers": resolve_workers(cfg, device)}
    if resume:
        _check_resumable(json.loads(config_path.read_text())["config"], resolved, run_dir)
    # -- resume: the checkpoint's step, and the metrics up to it (later records were never checkpointed). Checked
    # before anything in the folder is written, so a failed --resume leaves the run as it was.
    start, records, state = 0, [], None
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True)
        start = int(state["step"])
        if start > cfg.steps:
            raise ValueError(f"{run_dir} is already at step {start:,}, beyond steps={cfg.steps:,}")
        if not metrics_path.is_file():
            raise FileNotFoundError(f"cannot resume {run_dir}: {ckpt_path.name} is at step {start:,} but "
                                    f"{metrics_path.name} is missing; restore it, or start a new run")
        records = [r for r in read_metrics(metrics_path) if r["step"] <= start]
        if not records or records[-1]["step"] != start:
            raise ValueError(f"cannot resume {run_dir}: {ckpt_path.name} is at step {start:,} but "
                             f"{metrics_path.name} has no record of step {start:,}")
    meta = {
        "config": resolved,
        "paper": "Ioffe & Szegedy 2015, section 4.1, Figure 1",
        "our_choices": ["optimizer", "lr", "init_std", "bn_momentum", "eval_every", "probe_unit"],
        "data": {"source": ds.source, "location": ds.location, "train": len(ds.train_labels),
                 "test": len(ds.test_labels)},
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
    }

    old_threads, nets, bar = torch.get_num_threads(), {}, None
    t0 = time.perf_counter()
    try:
        # -- the two networks, from the same weights, each in its own process or both in this one
        if cfg.threads is not None and device == "cpu":
            torch.set_num_threads(cfg.threads)
        for v in VARIANTS:
            nets[v] = Worker(v, cfg, ds, device) if resolved["workers"] > 1 else Local(build_net(v, cfg, ds, device))
        if state is not None:
            for v, net in nets.items():
                net.send("load_state_dict", state["nets"][v])
            for net in nets.values():
                net.recv()
            log(f"normlab: resuming {run_dir} at step {start:,} of {cfg.steps:,}")
        # the configuration, once the checkpoint is checked and loaded: a failed --resume leaves config.json as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(config_path, json.dumps(meta, indent=2) + "\n")

        def evaluate(step: int, train_loss: dict | None) -> None:
            ev = call_all(nets, "evaluate")
            losses = train_loss or dict.fromkeys(VARIANTS)  # None at step 0: nothing trained yet
            records.append({"step": step, **{v: {"train_loss": losses[v], **ev[v]} for v in VARIANTS}})
            write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in records))
            # after the metrics: a crash between the two only costs this interval again
            save_atomic(ckpt_path, {"step": step, "nets": call_all(nets, "state_dict")})
            if on_eval is not None:
                on_eval(records[-1])

        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                       desc=f"mnist ({cfg.engine}, {device}, {resolved['workers']} proc)")
        if not records:
            evaluate(0, None)
        # -- the loop: eval_every steps of both networks, then evaluate both
        step = start
        while step < cfg.steps:
            end = min((step // cfg.eval_every + 1) * cfg.eval_every, cfg.steps)
            train_loss = call_all(nets, "train", step, end)
            step = end
            evaluate(step, train_loss)
            if bar is not None:
                bar.update(step - bar.n)
                bar.set_postfix({LABELS[v]: f"{records[-1][v]['test_acc']:.4f}" for v in VARIANTS})
        cpu = call_all(nets, "cpu_seconds") if resolved["workers"] > 1 else {"both": time.process_time()}
    finally:
        if bar is not None:
            bar.close()
        for net in nets.values():
            net.close()
        torch.set_num_threads(old_threads)
    wall = time.perf_counter() - t0

    # -- summary, figure, table
    summary = {"config": resolved, "data": meta["data"], "wall_s_this_session": round(wall, 2),
               "cpu_s_this_session": {k: round(v, 2) for k, v in cpu.items()},
               "steps_this_session": cfg.steps - start, **summarize(records)}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    from normlab.lab.plots import plot_figure1

    fig = plot_figure1(run_dir)
    if ds.source == "sample":
        log("!! These numbers come from the small shipped sample, not from MNIST: they are NOT the paper's.")
    log(format_table(summary))
    cpu_text = ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
    log(f"normlab: {cfg.steps - start:,} steps of both networks in {wall:.1f} s on {device} "
        f"({cfg.engine} engine, {resolved['workers']} process(es); CPU time: {cpu_text})")
    log(f"normlab: figure  {fig}")
    log(f"normlab: table   {run_dir / 'summary.json'}  (metrics: {metrics_path})")
    return summary
