"""The experiment skeleton: the generic runner (any arms, any workers, seeds, resume), the run-folder reader, the
registry and the generated CLI, and what a new user hit (one-line errors, data source on resume, the Ctrl-C hint)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from normlab.lab import cli, registry, runner
from normlab.lab import data as D
from normlab.lab.data import DataOrder
from normlab.lab.experiment import Experiment, RunConfig, TorchArm, device_data
from normlab.lab.metrics import markdown_table
from normlab.lab.models import make_mlp
from normlab.lab.plots import pyplot
from normlab.lab.rundir import RunError, RunFolder


@dataclass
class ToyConfig(RunConfig):
    steps: int = 20
    eval_every: int = 10
    batch_size: int = 32
    dropout: float = field(default=0.5, metadata={"help": "dropout after each hidden block"})


class Toy(Experiment):
    """Three small MLPs (no norm, batch norm, layer norm), all with dropout: the RNG must not leak between arms."""

    name = "toy"
    title = "a tiny experiment for the tests"
    config = ToyConfig
    figure_name = "toy.png"

    def arms(self, cfg):
        return ("none", "batch", "layer")

    def build_arm(self, arm, cfg, ds, device):
        torch.manual_seed(cfg.seed)
        net = make_mlp((784, 16, 10), norm=arm, activation="relu", dropout=cfg.dropout)
        order = DataOrder(len(ds.train_labels), cfg.batch_size, cfg.seed)
        return TorchArm(arm, net, device_data(ds, device), order, cfg.seed, device, lr=0.1)

    def summarize(self, cfg, records):
        return {"final": {k: v["test_acc"] for k, v in records[-1].items() if k != "step"}}

    def table(self, summary, meta):
        return markdown_table(("arm", "test acc"), [(k, f"{v:.4f}") for k, v in summary["final"].items()])

    def plot(self, records, meta):
        fig, ax = pyplot().subplots()
        for k in records[0]:
            if k != "step":
                ax.plot([r["step"] for r in records], [r[k]["test_acc"] for r in records], label=k)
        return fig


TOY = Toy()
QUIET = {"progress": False, "log": lambda m: None}


def toy(real_dir, **kw) -> ToyConfig:
    return ToyConfig(**{"device": "cpu", "data_dir": str(real_dir), **kw})


def test_any_number_of_arms_same_bytes_with_any_number_of_workers(real_dir, tmp_path):
    outs = {}
    for w in (1, 2, 3):  # 3 arms: all in this process, 2+1 in two workers, one worker each
        outs[w] = tmp_path / f"w{w}"
        runner.run(TOY, toy(real_dir, workers=w), out=outs[w], **QUIET)
    metrics = {w: (o / "metrics.jsonl").read_bytes() for w, o in outs.items()}
    assert metrics[1] == metrics[2] == metrics[3]
    run = RunFolder(outs[2])
    assert run.config()["workers"] == 2 and run.experiment() == "toy"
    recs = run.records()
    assert [r["step"] for r in recs] == [0, 10, 20] and list(recs[-1]) == ["step", "none", "batch", "layer"]
    assert set(recs[-1]["batch"]) == {"train_loss", "test_loss", "test_acc"}
    assert (outs[2] / "toy.png").read_bytes()[:4] == b"\x89PNG" and (outs[2] / "table.md").is_file()
    assert run.summary()["final"] == {k: recs[-1][k]["test_acc"] for k in ("none", "batch", "layer")}


def test_seeds_train_each_arm_once_per_seed(real_dir, tmp_path):
    runner.run(TOY, toy(real_dir, steps=10, seeds=2, seed=3, workers=1), out=tmp_path / "s", **QUIET)
    rec = RunFolder(tmp_path / "s").records()[-1]
    assert list(rec) == ["step", "none/s3", "batch/s3", "layer/s3", "none/s4", "batch/s4", "layer/s4"]
    assert rec["batch/s3"] != rec["batch/s4"]


def test_resume_with_dropout_equals_uninterrupted(real_dir, tmp_path, monkeypatch):
    runner.run(TOY, toy(real_dir, workers=1), out=tmp_path / "whole", **QUIET)
    indices = DataOrder.indices

    def interrupt_at_15(self, step):
        if step == 15:
            raise KeyboardInterrupt
        return indices(self, step)

    monkeypatch.setattr(DataOrder, "indices", interrupt_at_15)
    with pytest.raises(KeyboardInterrupt):
        runner.run(TOY, toy(real_dir, workers=1), out=tmp_path / "cut", **QUIET)
    monkeypatch.setattr(DataOrder, "indices", indices)
    runner.run(TOY, toy(real_dir, workers=2), out=tmp_path / "cut", resume=True, **QUIET)
    assert (tmp_path / "cut" / "metrics.jsonl").read_bytes() == (tmp_path / "whole" / "metrics.jsonl").read_bytes()


@pytest.fixture
def no_download(monkeypatch):
    def fail(*a, **k):
        raise D.DownloadError("no network in this test")

    monkeypatch.setattr(D, "download_mnist", fail)


@dataclass
class TupleToyConfig(ToyConfig):
    widths: tuple[int, ...] = field(default=(16,), metadata={"help": "hidden widths"})


class TupleToy(Toy):
    config = TupleToyConfig


def test_resume_of_a_config_with_a_tuple_field(real_dir, tmp_path):
    # config.json holds the tuple as a list: the resume must not see that as another configuration
    exp, out = TupleToy(), tmp_path / "t"
    runner.run(exp, TupleToyConfig(steps=10, device="cpu", data_dir=str(real_dir), workers=1), out=out, **QUIET)
    assert RunFolder(out).config()["widths"] == [16]
    runner.run(exp, TupleToyConfig(steps=20, device="cpu", data_dir=str(real_dir), workers=1), out=out,
               resume=True, **QUIET)
    assert [r["step"] for r in RunFolder(out).records()] == [0, 10, 20]
    with pytest.raises(ValueError, match=r"widths: run has \[16\], asked for \[8\]"):
        runner.run(exp, TupleToyConfig(steps=20, widths=(8,), device="cpu", data_dir=str(real_dir), workers=1),
                   out=out, resume=True, **QUIET)


def test_sample_run_says_so_and_resume_refuses_other_data(real_dir, tmp_path, no_download):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "on-sample"
    runner.run(TOY, toy(empty, steps=10, workers=1), out=out, **QUIET)
    assert RunFolder(out).is_sample()
    assert "NOT the paper's experiment" in (out / "table.md").read_text()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunError) as err:  # --data-dir may change on resume, the data may not
        runner.run(TOY, toy(real_dir, steps=20, workers=1), out=out, resume=True, **QUIET)
    msg = str(err.value)
    assert "sample at" in msg and f"files at {real_dir}" in msg and "60000 training" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a refused resume changes nothing


def test_data_dir_typed_must_exist_and_is_checked_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "load_mnist", lambda *a, **k: pytest.fail("data loaded before the arguments were checked"))
    missing = tmp_path / "no-such-dir"
    assert cli.main(["mnist", "--data-dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: data_dir") and str(missing) in err and err.count("\n") == 1
    assert not missing.exists() and not (tmp_path / "o").exists()
    for args in (["--lr", "-1"], ["--batch-size", "1"], ["--device", "nonsense"]):
        assert cli.main(["mnist", *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("normlab: error:") and err.count("\n") == 1, err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("normlab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_unwritable_out_is_one_line(real_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "load_mnist", lambda *a, **k: pytest.fail("data loaded before the run folder was checked"))
    (tmp_path / "file").write_text("x")
    assert cli.main(["mnist", "--out", str(tmp_path / "file" / "run")]) == 2  # under a file
    assert "a file is in the way" in _one_line_error(capsys)
    if Path("/sys").is_dir():  # even root may not create folders here
        assert cli.main(["mnist", "--out", "/sys/normlab-test-run"]) == 2
        assert "/sys/normlab-test-run" in _one_line_error(capsys)
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli.main(["mnist", "--out", str(locked / "run")]) == 2
        assert "ermission denied" in _one_line_error(capsys)


def _fake_run(folder: Path, n: int = 3) -> Path:
    folder.mkdir()
    rec = lambda s: {"train_loss": None, "test_loss": 1.0, "test_acc": 0.1 + 0.2 * s, "p15": -1.0, "p50": 0.0,
                     "p85": 1.0}
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": 10 * s, "plain": rec(s), "bn": rec(s)}) + "\n"
                                                  for s in range(n)))
    (folder / "config.json").write_text(json.dumps({"experiment": "mnist", "config": {"steps": 10 * (n - 1)}}))
    return folder


def test_plot_picks_the_experiment_and_unwritable_out_is_one_line(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert cli.main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "figure1.png")
    (tmp_path / "file").write_text("x")
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "file" / "f.png")]) == 2
    assert "a file is in the way" in _one_line_error(capsys)
    if Path("/sys").is_dir():
        assert cli.main(["plot", str(run), "--out", "/sys/normlab-test/f.png"]) == 2
        _one_line_error(capsys)
    (run / "config.json").write_text(json.dumps({"experiment": "nonesuch", "config": {}}))
    assert cli.main(["plot", str(run)]) == 2
    assert "no experiment named 'nonesuch'; known: mnist" in _one_line_error(capsys)


def test_resume_of_a_broken_config_is_one_line_naming_the_file(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    (run / "config.json").write_text(json.dumps({"experiment": "mnist"}))
    assert cli.main(["mnist", "--resume", "--out", str(run)]) == 2
    assert f"{run / 'config.json'} has no 'config' entry" in _one_line_error(capsys)
    (run / "config.json").write_text('{"config": {"steps": 5,}')
    assert cli.main(["mnist", "--resume", "--out", str(run)]) == 2
    assert f"{run / 'config.json'} is not valid JSON at line 1" in _one_line_error(capsys)
    (run / "config.json").unlink()
    assert cli.main(["mnist", "--resume", "--out", str(run)]) == 2
    assert "holds no run (no config.json)" in _one_line_error(capsys)
    (run / "config.json").write_text(json.dumps({"experiment": "mnist", "config": {}}))
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 10, broken\n')
    with pytest.raises(RunError, match=r"metrics.jsonl is not valid JSON at line 2"):
        RunFolder(run).records()


def test_resume_without_checkpoint_says_it_restarts(real_dir, tmp_path):
    out = tmp_path / "r"
    runner.run(TOY, toy(real_dir, steps=10, workers=1), out=out, **QUIET)
    (out / "checkpoint.pt").unlink()
    log = []
    runner.run(TOY, toy(real_dir, steps=10, workers=1), out=out, resume=True, progress=False, log=log.append)
    assert "has no checkpoint.pt" in log[0] and "restarting from step 0" in log[0]


def test_resume_of_another_experiments_run_is_refused(real_dir, tmp_path):
    out = tmp_path / "r"
    runner.run(TOY, toy(real_dir, steps=10, workers=1), out=out, **QUIET)
    with pytest.raises(RunError, match="is a 'toy' run, not 'mnist'"):
        runner.run(registry.get("mnist"), registry.get("mnist").config(device="cpu"), out=out, resume=True, **QUIET)


def test_invocation_is_a_command_that_works_from_here(tmp_path, monkeypatch):
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    script = venv_bin / "normlab"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv is not active
    monkeypatch.setattr(sys, "argv", [str(script), "mnist"])
    assert cli.invocation() == [".venv/bin/normlab"]
    monkeypatch.setenv("PATH", f"{venv_bin}:/usr/bin:/bin")  # it is
    assert cli.invocation() == ["normlab"]
    monkeypatch.setattr(sys, "argv", ["/somewhere/normlab/__main__.py", "mnist"])  # python -m normlab
    assert cli.invocation()[-2:] == ["-m", "normlab"]


def test_ctrl_c_prints_the_resume_command(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    monkeypatch.setattr(cli, "invocation", lambda: [".venv/bin/normlab"])
    assert cli.main(["mnist", "--out", str(tmp_path / "my run")]) == 130
    err = capsys.readouterr().err
    assert f".venv/bin/normlab mnist --resume --out '{tmp_path / 'my run'}'" in err


def test_flags_come_from_the_config_fields(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["mnist", "--batch-size", "30", "--standardize", "--seeds", "3", "--quick"])
    cfg = cli.config_from_args(registry.get("mnist"), args)
    assert (cfg.batch_size, cfg.standardize, cfg.seeds, cfg.steps, cfg.eval_every) == (30, True, 3, 4000, 250)
    args = parser.parse_args(["mnist", "--no-standardize", "--steps", "7"])
    cfg = cli.config_from_args(registry.get("mnist"), args)
    assert (cfg.standardize, cfg.steps, cfg.eval_every) == (False, 7, 500)
    with pytest.raises(SystemExit):
        parser.parse_args(["mnist", "--engine", "jax"])
    assert "invalid choice: 'jax'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "mnist" in out and "reproduce the paper's MNIST experiment" in out and "plot" in out


def test_registry_refuses_two_experiments_with_one_name():
    assert "mnist" in registry.experiments()

    class Other(Toy):
        name = "mnist"

    with pytest.raises(ValueError, match="two experiments are named 'mnist'"):
        registry.register(Other)
