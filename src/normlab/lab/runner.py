"""The one runner: trains an experiment's arms side by side and owns the run folder, resume, progress and Ctrl-C.

All arms start together and see the same mini-batches in the same order (the data order is a pure function of
``(seed, step)``). Every ``eval_every`` steps each arm is evaluated, and one record per evaluation is appended to
``metrics.jsonl``. The arms are spread over ``workers`` processes (default: one per arm on the CPU, at most one per
core); they exchange nothing but step numbers, and each does exactly the computation it would do alone with the
same thread count, so the number of workers never changes the numbers (tested).

A run folder holds (:mod:`normlab.lab.rundir` reads it)::

    config.json      the experiment, the exact command, the resolved configuration, data source, versions, host
    metrics.jsonl    one record per evaluation: {"step": s, "<arm>": {"train_loss": .., <the arm's measures>}, ..}
    summary.json     the experiment's headline numbers (its summarize hook) and the session's time
    table.md         ours beside the published numbers (its table hook), as printed at the end
    <figure>.png     the experiment's figure, drawn from metrics.jsonl alone (normlab plot RUN redraws it)
    checkpoint.pt    every arm's state at the last evaluation, for --resume

Each file is replaced atomically and fsynced (:func:`normlab.lab.files.atomic_write`), so an interrupted run, even
by a power cut, leaves the previous complete version, never a torn one.

Resuming: the checkpoint is written at each evaluation, right after that evaluation's metrics record, and at no
other time (not on Ctrl-C either: a network interrupted mid-step has no consistent state to save). ``--resume``
continues from the last checkpoint's step; the metrics records after that step, if any, are dropped, and the steps
since that evaluation, at most ``eval_every``, are trained again. Since the data order is a pure function of
``(seed, step)``, the arms' RNG is reseeded per segment and the networks' and optimizers' states are restored
exactly, the resumed run writes metrics byte-identical to an uninterrupted run's. Every check of a --resume (the
experiment, the configuration, the checkpoint, the metrics, the data source) comes before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import normlab
from normlab.lab import files
from normlab.lab.experiment import Experiment, RunConfig, release_device_data, resolve_device, units
from normlab.lab.rundir import RunError, RunFolder


def _describe_data(d: dict) -> str:
    return f"{d.get('source')} at {d.get('location')} ({d.get('train')} training / {d.get('test')} test images)"


# ---------------------------------------------------------------------------------------------------------------
# hosts: a group of arms in this process (Local) or in a worker process (Worker), behind one interface:
# send(method, *args), then recv() -> {key: result}. States go in and out as {key: state}.


def _build(exp: Experiment, group: list[tuple[str, str, int]], cfg: RunConfig, ds, device: str) -> dict:
    return {key: exp.build_arm(arm, dataclasses.replace(cfg, seed=seed), ds, device) for key, arm, seed in group}


def _call(arms: dict, method: str, *args) -> dict:
    if method == "load_state_dict":
        return {k: arms[k].load_state_dict(args[0][k]) for k in arms}
    return {k: getattr(a, method)(*args) for k, a in arms.items()}


class Local:
    """Arms in this process."""

    def __init__(self, exp, group, cfg, ds, device):
        self.keys = [k for k, _, _ in group]
        self.arms, self._result = _build(exp, group, cfg, ds, device), None

    def send(self, method: str, *args) -> None:
        self._result = _call(self.arms, method, *args)

    def recv(self) -> dict:
        return self._result

    def close(self) -> None:
        self.arms = {}
        release_device_data()


def _worker(conn, threads: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then closes us
    code = 0
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        setup = conn.recv()  # (exp, group, cfg, ds, device), or None: closed before any call
        arms = _build(*setup) if setup is not None else None
        while arms is not None and (msg := conn.recv()) is not None:
            if msg[0] == "cpu_seconds":  # this process's CPU time: what the run costs on an idle core
                conn.send(("ok", time.process_time()))
                continue
            conn.send(("ok", _call(arms, *msg)))
    except EOFError:  # the parent is gone
        pass
    except Exception:
        conn.send(("error", traceback.format_exc()))
        code = 1
    # Leave without the interpreter's teardown of torch and the data (0.8 s here, which the parent's close waits for):
    # everything this process owes the parent has gone through the pipe.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class Worker:
    """Arms in a worker process (spawned: a forked torch can hang), with :class:`Local`'s interface. The experiment
    is pickled to it: its class must be importable (defined at module level).

    The process starts with nothing but its thread count; the experiment and the data go with the first call. A
    spawned process reads what it is sent only once it has imported torch (1.5 s here), and sending blocks until it
    reads: sent at the start, the data would make each worker's start wait for the last one's import."""

    def __init__(self, exp, group, cfg, ds, device):
        self.keys = [k for k, _, _ in group]
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self._setup = (exp, group, cfg, ds, device)
        self.proc = ctx.Process(target=_worker, args=(child, cfg.threads), daemon=True)
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
        if self._setup is not None:
            self.conn.send(self._setup)
            self._setup = None
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


def call_all(hosts: list, method: str, *args, order: list[str]) -> dict:
    """Call ``method`` on every arm (concurrently across workers); returns ``{key: result}`` in ``order``."""
    for h in hosts:
        h.send(method, *[{k: a[k] for k in h.keys} if isinstance(a, dict) else a for a in args])
    out = {}
    for h in hosts:
        out.update(h.recv())
    return {k: out[k] for k in order}


def resolve_workers(cfg: RunConfig, device: str, n_arms: int) -> int:
    """Processes to train in: ``cfg.workers`` (at most one per arm), or by default one per arm on a CPU, at most
    one per core, and 1 on a GPU."""
    if cfg.workers is not None:
        return min(cfg.workers, n_arms)
    return max(1, min(n_arms, os.cpu_count() or 1)) if device == "cpu" else 1


def default_out(exp: Experiment, cfg: RunConfig) -> Path:
    """A fresh run folder under ``./runs``: ``runs/<experiment>-s<seed>-<time>`` (mnist adds its engine)."""
    engine = getattr(cfg, "engine", None)
    tag = f"{exp.name}-{engine}" if engine else exp.name
    return Path("runs") / f"{tag}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resumable(exp: Experiment, saved: dict, cfg: dict, run: RunFolder) -> None:
    # a field the saved run lacks (it predates the field) had the field's default; both sides as config.json holds
    # them (a tuple field is a JSON list there)
    saved = json.loads(json.dumps({**dataclasses.asdict(exp.config()), **saved}))
    cfg = json.loads(json.dumps(cfg))
    diff = {k: (saved.get(k), cfg[k]) for k in cfg if k not in exp.resumable_changes and saved.get(k) != cfg[k]}
    if diff:
        detail = ", ".join(f"{k}: run has {a!r}, asked for {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume {run.path} with a different configuration ({detail})")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the run


def run(exp: Experiment, cfg: RunConfig, out: str | os.PathLike | None = None, resume: bool = False,
        progress: bool | None = None, on_eval: Callable[[dict], None] | None = None,
        log: Callable[[str], None] | None = None, command: list[str] | None = None, quick: bool = False) -> dict:
    """Train ``exp``'s arms by ``cfg``, write the run folder ``out``, and return the summary.

    Args:
        exp: the experiment (see :mod:`normlab.lab.experiment`).
        cfg: its configuration; ``device="auto"`` and ``workers=None`` are resolved and recorded.
        out: the run folder (default: a new one under ``./runs``). Must not hold a run unless ``resume``.
        resume: continue the run in ``out`` from its checkpoint (see the module's docstring). The configuration
            must match the saved one except for ``exp.resumable_changes``, and the data source must be the same.
            A run folder without a checkpoint starts again from step 0 (and says so).
        progress: show a progress bar (default: when stderr is a terminal).
        on_eval: called with each new metrics record, after it and the checkpoint are written.
        log: where messages go (default: stderr).
        command: the command line that started the run, recorded in config.json.
        quick: whether this is the ``--quick`` run (recorded; the figure and table say so).
    """
    log = log or _stderr
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise ValueError(f"data_dir {cfg.data_dir} does not exist (it is not created: check for a typo); leave "
                         "--data-dir out to use $NORMLAB_DATA or the user cache")
    run_dir = RunFolder(out if out is not None else default_out(exp, cfg))
    unit_list = units(exp, cfg)
    keys = [k for k, _, _ in unit_list]
    resolved = {**dataclasses.asdict(cfg), "device": device,
                "workers": resolve_workers(cfg, device, len(unit_list))}

    # -- every check of a --resume, before data are loaded and before anything in the folder is written
    start, records, state, saved_meta = 0, [], None, None
    if resume:
        saved_meta = run_dir.meta()
        saved_cfg = run_dir.config()
        if run_dir.experiment() != exp.name:
            raise RunError(f"{run_dir.path} is a {run_dir.experiment()!r} run, not {exp.name!r}: continue it with "
                           f"normlab {run_dir.experiment()} --resume --out {run_dir.path}")
        _check_resumable(exp, saved_cfg, resolved, run_dir)
        quick = quick or bool(saved_meta.get("quick"))
        if run_dir.checkpoint_path.is_file():
            state = torch.load(run_dir.checkpoint_path, weights_only=True)
            start = int(state["step"])
            if start > cfg.steps:
                raise ValueError(f"{run_dir.path} is already at step {start:,}, beyond steps={cfg.steps:,}")
            if not run_dir.metrics_path.is_file():
                raise FileNotFoundError(f"cannot resume {run_dir.path}: {run_dir.checkpoint_path.name} is at step "
                                        f"{start:,} but {run_dir.metrics_path.name} is missing; restore it, or start "
                                        "a new run")
            records = [r for r in run_dir.records() if r["step"] <= start]
            if not records or records[-1]["step"] != start:
                raise ValueError(f"cannot resume {run_dir.path}: {run_dir.checkpoint_path.name} is at step {start:,} "
                                 f"but {run_dir.metrics_path.name} has no record of step {start:,}")
            missing = [k for k in keys if k not in state["nets"]]
            if missing:
                raise RunError(f"cannot resume {run_dir.path}: {run_dir.checkpoint_path} has no state for "
                               f"{', '.join(missing)}")
        else:
            log(f"normlab: {run_dir.path} has no {run_dir.checkpoint_path.name} (no evaluation was saved): "
                "restarting from step 0")
    elif run_dir.metrics_path.exists():
        raise FileExistsError(f"{run_dir.path} already holds a run; pass --resume to continue it or choose another "
                              "--out")
    created = files.writable_dir(run_dir.path, "the run folder")

    old_threads, hosts, bar = torch.get_num_threads(), [], None
    wrote = False
    try:
        # -- data; a resumed run must train on what it started on
        ds = exp.load_data(cfg, log)
        data = {"source": ds.source, "location": ds.location, "train": len(ds.train_labels),
                "test": len(ds.test_labels)}
        if saved_meta is not None and "data" in saved_meta:
            old = saved_meta["data"]
            if (old.get("source"), old.get("train"), old.get("test")) != (data["source"], data["train"], data["test"]):
                raise RunError(f"cannot resume {run_dir.path} on other data: it was trained on "
                               f"{_describe_data(old)}, this run would use {_describe_data(data)}; point --data-dir "
                               "(or $NORMLAB_DATA) at the run's data")
        meta = {
            "experiment": exp.name,
            "command": command,
            "quick": quick,
            "config": resolved,
            "paper": exp.paper,
            "our_choices": list(exp.our_choices),
            "data": data,
            "versions": {"normlab": normlab.__version__, "python": platform.python_version(), "numpy": np.__version__,
                         "torch": torch.__version__},
            "host": {"platform": platform.platform(), "cpus": os.cpu_count(),
                     "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
        }

        # -- the arms, from the same weights, spread over the worker processes (or all in this one)
        t0 = time.perf_counter()
        if cfg.threads is not None and device == "cpu":
            torch.set_num_threads(cfg.threads)
        n_hosts = resolved["workers"]
        groups = [unit_list[i::n_hosts] for i in range(n_hosts)]
        for g in groups:
            hosts.append(Worker(exp, g, cfg, ds, device) if n_hosts > 1 else Local(exp, g, cfg, ds, device))
        if state is not None:
            call_all(hosts, "load_state_dict", state["nets"], order=keys)
            log(f"normlab: resuming {run_dir.path} at step {start:,} of {cfg.steps:,}")
        # the configuration, once the checkpoint is checked and loaded: a failed --resume leaves config.json as it was
        files.write_text(run_dir.config_path, json.dumps(meta, indent=2) + "\n")
        wrote = True

        def evaluate(step: int, train_loss: dict | None) -> None:
            ev = call_all(hosts, "evaluate", order=keys)
            losses = train_loss or dict.fromkeys(keys)  # None at step 0: nothing trained yet
            records.append({"step": step, **{k: {"train_loss": losses[k], **ev[k]} for k in keys}})
            files.write_text(run_dir.metrics_path, "".join(json.dumps(r) + "\n" for r in records))
            # after the metrics: a crash between the two only costs this interval again
            nets = call_all(hosts, "state_dict", order=keys)
            files.atomic_write(run_dir.checkpoint_path, lambda f: torch.save({"step": step, "nets": nets}, f))
            if on_eval is not None:
                on_eval(records[-1])

        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                       desc=f"{exp.name} ({device}, {n_hosts} proc)")
        if not records:
            evaluate(0, None)
        # -- the loop: eval_every steps of every arm, then evaluate them all
        step = start
        while step < cfg.steps:
            end = min((step // cfg.eval_every + 1) * cfg.eval_every, cfg.steps)
            train_loss = call_all(hosts, "train", step, end, order=keys)
            step = end
            evaluate(step, train_loss)
            if bar is not None:
                bar.update(step - bar.n)
                acc = {exp.label(k): f"{v['test_acc']:.4f}" for k, v in records[-1].items()
                       if isinstance(v, dict) and isinstance(v.get("test_acc"), float)}
                bar.set_postfix(acc)
        if n_hosts > 1:
            for h in hosts:
                h.send("cpu_seconds")
            cpu = {"+".join(h.keys): h.recv() for h in hosts}
        else:
            cpu = {"+".join(keys): time.process_time()}
        wall = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
        for h in hosts:
            h.close()
        torch.set_num_threads(old_threads)
        if created and not wrote and run_dir.path.is_dir() and not any(run_dir.path.iterdir()):
            run_dir.path.rmdir()  # a run that failed before writing anything leaves no empty folder behind

    # -- summary, table, figure
    summary = {"experiment": exp.name, "config": resolved, "data": meta["data"], "quick": quick,
               "wall_s_this_session": round(wall, 2), "cpu_s_this_session": {k: round(v, 2) for k, v in cpu.items()},
               "steps_this_session": cfg.steps - start, **exp.summarize(cfg, records)}
    files.write_text(run_dir.summary_path, json.dumps(summary, indent=2) + "\n")
    table = table_text(exp, summary, meta)
    files.write_text(run_dir.table_path, table + "\n")
    from normlab.lab.plots import save_figure

    fig = save_figure(exp.plot(records, meta), run_dir.path / exp.figure_name)
    log(table)
    cpu_text = ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items())
    log(f"normlab: {cfg.steps - start:,} steps of {len(keys)} network(s) in {wall:.1f} s on {device} "
        f"({n_hosts} process(es); CPU time: {cpu_text})")
    log(f"normlab: figure  {fig}")
    log(f"normlab: table   {run_dir.table_path}  (summary: {run_dir.summary_path}, metrics: {run_dir.metrics_path})")
    return summary


def table_text(exp: Experiment, summary: dict, meta: dict) -> str:
    """table.md: the experiment's table under a heading that says what the run was (quick, sample)."""
    head = [f"## {exp.title}", ""]
    cfg = meta.get("config", {})
    if meta.get("data", {}).get("source") == "sample":
        head += ["**!! These numbers come from the small sample shipped with normlab, not from MNIST: they are NOT "
                 "the paper's experiment.**", ""]
    if meta.get("quick"):
        head += [f"*Quick run (`--quick`): {cfg.get('steps', 0):,} steps, a demo of the protocol, not its numbers.*",
                 ""]
    if meta.get("command"):
        head += [f"Command: `{shlex.join(meta['command'])}`", ""]
    return "\n".join([*head, exp.table(summary, meta)])
