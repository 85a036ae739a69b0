"""The Figure 1 experiment (``normlab mnist``) on the real data, in short runs: outputs, BN's lead, engines,
determinism, resume, and the --quick run's bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import run_quick

from normlab.lab import data as D
from normlab.lab import runner
from normlab.lab.cli import main
from normlab.lab.data import DataOrder
from normlab.lab.experiments.mnist import Mnist, MnistConfig, network
from normlab.lab.rundir import RunFolder
from normlab.nn import BatchNorm1d

EXP = Mnist()


def run(cfg, **kw):
    return runner.run(EXP, cfg, **kw)


def read_metrics(path):
    return RunFolder(path.parent).records()


def build_net(arm, cfg, ds, device):
    return EXP.build_arm(arm, cfg, ds, device)

STEPS, EVERY = 300, 100


def short(real_dir, **kw) -> MnistConfig:
    return MnistConfig(**{"steps": STEPS, "eval_every": EVERY, "device": "cpu", "data_dir": str(real_dir), **kw})


@pytest.fixture(scope="module")
def base_run(real_dir, tmp_path_factory):
    """One uninterrupted short run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("run") / "base"
    summary = run(short(real_dir), out=out, progress=False, log=lambda m: None)
    return out, summary


def test_run_writes_well_formed_files(base_run):
    out, summary = base_run
    meta = json.loads((out / "config.json").read_text())
    cfg = meta["config"]
    assert (cfg["steps"], cfg["batch_size"], cfg["optimizer"], cfg["device"]) == (STEPS, 60, "sgd", "cpu")
    assert {"lr", "init_std", "bn_momentum", "seed"} <= set(cfg)
    assert meta["data"] == {**meta["data"], "source": "files", "train": 60000, "test": 10000}
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 100, 200, 300]
    for r in records:
        for v in ("plain", "bn"):
            assert set(r[v]) == {"train_loss", "test_loss", "test_acc", "p15", "p50", "p85"}
            assert all(np.isfinite(x) for k, x in r[v].items() if x is not None)
    assert json.loads((out / "summary.json").read_text())["final"] == summary["final"]
    assert summary["final_step"] == STEPS
    png = (out / "figure1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 500_000
    assert (out / "checkpoint.pt").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left over


def test_percentiles_ordered_accuracy_above_chance_bn_ahead(base_run):
    records = read_metrics(base_run[0] / "metrics.jsonl")
    for r in records:
        for v in ("plain", "bn"):
            assert r[v]["p15"] <= r[v]["p50"] <= r[v]["p85"]
    for r in records[1:]:
        assert r["bn"]["test_acc"] > r["plain"]["test_acc"] + 0.2, r["step"]  # BN ahead at equal steps
    assert records[-1]["bn"]["test_acc"] > 0.85  # chance is 0.1
    # BN keeps its sigmoid inputs spread around zero; without BN they collapse onto a drifting point.
    bn, plain = records[-1]["bn"], records[-1]["plain"]
    assert bn["p85"] - bn["p15"] > 1.0 > plain["p85"] - plain["p15"]


def test_same_seed_same_metrics(base_run, real_dir, tmp_path):
    # Run again in this process (workers=1); the base run trained the networks in two worker processes.
    assert json.loads((base_run[0] / "config.json").read_text())["config"]["workers"] == 2
    run(short(real_dir, workers=1), out=tmp_path / "again", progress=False, log=lambda m: None)
    assert (tmp_path / "again" / "metrics.jsonl").read_bytes() == (base_run[0] / "metrics.jsonl").read_bytes()


def test_other_seed_other_metrics(base_run, real_dir, tmp_path):
    run(short(real_dir, steps=EVERY, seed=1, workers=1), out=tmp_path / "s1", progress=False, log=lambda m: None)
    assert read_metrics(tmp_path / "s1" / "metrics.jsonl")[1] != read_metrics(base_run[0] / "metrics.jsonl")[1]


def test_resume_equals_uninterrupted(base_run, real_dir, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    indices = DataOrder.indices

    def interrupt_at_250(self, step):  # Ctrl-C in the middle of an evaluation interval
        if step == 250:
            raise KeyboardInterrupt
        return indices(self, step)

    monkeypatch.setattr(DataOrder, "indices", interrupt_at_250)
    with pytest.raises(KeyboardInterrupt):  # in this process: a worker process would not see the patch
        run(short(real_dir, workers=1), out=out, progress=False, log=lambda m: None)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0, 100, 200]
    monkeypatch.setattr(DataOrder, "indices", indices)

    with pytest.raises(FileExistsError):  # a run folder is never overwritten by accident
        run(short(real_dir), out=out, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="lr"):  # nor continued with different numbers
        run(short(real_dir, lr=0.1), out=out, resume=True, progress=False, log=lambda m: None)

    log = []
    run(short(real_dir), out=out, resume=True, progress=False, log=log.append)
    assert "resuming" in log[0] and "step 200" in log[0]
    assert (out / "metrics.jsonl").read_bytes() == (base_run[0] / "metrics.jsonl").read_bytes()


def test_failed_resume_changes_nothing(real_dir, tmp_path):
    out = tmp_path / "r"
    quiet = dict(progress=False, log=lambda m: None)
    run(short(real_dir, steps=20, eval_every=10, workers=1), out=out, **quiet)
    names = ("config.json", "metrics.jsonl", "checkpoint.pt")
    before = {n: (out / n).read_bytes() for n in names}

    def unchanged():
        return {n: (out / n).read_bytes() for n in names if (out / n).exists()} == {
            n: b for n, b in before.items() if (out / n).exists()}

    # the checkpoint is beyond the steps asked for: config.json keeps steps=20
    with pytest.raises(ValueError, match="already at step 20, beyond steps=10"):
        run(short(real_dir, steps=10, eval_every=10, workers=1), out=out, resume=True, **quiet)
    assert unchanged()

    # metrics.jsonl is gone: trained weights must not be evaluated as step 0 and checkpointed over
    (out / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="metrics.jsonl is missing") as err:
        run(short(real_dir, steps=30, eval_every=10, workers=1), out=out, resume=True, **quiet)
    assert str(out) in str(err.value) and "checkpoint.pt is at step 20" in str(err.value)
    assert not (out / "metrics.jsonl").exists() and unchanged()

    # metrics.jsonl stops short of the checkpoint's step
    (out / "metrics.jsonl").write_text(before["metrics.jsonl"].decode().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="no record of step 20"):
        run(short(real_dir, steps=30, eval_every=10, workers=1), out=out, resume=True, **quiet)
    assert (out / "checkpoint.pt").read_bytes() == before["checkpoint.pt"]
    assert (out / "config.json").read_bytes() == before["config.json"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "steps must be >= 1, got steps=0"),
    ("batch_size", 1, "batch_size must be >= 2 (batch norm needs two samples), got batch_size=1"),
    ("engine", "jax", "engine must be one of ('torch', 'numpy'), got engine='jax'"),
])
def test_validate_names_the_field_and_its_value(field, value, message):
    with pytest.raises(ValueError) as err:
        MnistConfig(**{field: value}).validate()
    assert str(err.value) == message


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_numpy_and_torch_engines_agree_on_first_steps(real_dir, variant):
    ds = D.read_folder(real_dir)
    nets = {e: build_net(variant, MnistConfig(engine=e), ds, "cpu") for e in ("torch", "numpy")}
    for step in range(30):
        lt, ln = nets["torch"].train(step, step + 1), nets["numpy"].train(step, step + 1)
        assert abs(lt - ln) < 1e-5 * max(1.0, ln), (step, lt, ln)  # float32 against float64
    et, en = nets["torch"].evaluate(), nets["numpy"].evaluate()
    assert abs(et["test_acc"] - en["test_acc"]) <= 0.002
    np.testing.assert_allclose([et[k] for k in ("p15", "p50", "p85")], [en[k] for k in ("p15", "p50", "p85")],
                               atol=1e-3)


def test_numpy_engine_run_matches_torch_run(base_run, real_dir, tmp_path):
    run(short(real_dir, steps=EVERY, engine="numpy"), out=tmp_path / "np", progress=False, log=lambda m: None)
    numpy_recs = read_metrics(tmp_path / "np" / "metrics.jsonl")
    torch_recs = read_metrics(base_run[0] / "metrics.jsonl")
    assert [r["step"] for r in numpy_recs] == [0, EVERY]
    for a, b in zip(numpy_recs, torch_recs):
        assert a["step"] == b["step"]
        for v in ("plain", "bn"):
            assert abs(a[v]["test_acc"] - b[v]["test_acc"]) < 0.01, (a["step"], v)


def test_torch_network_uses_normlab_batchnorm():
    cfg = MnistConfig()
    net, plain = network("bn", cfg), network("plain", cfg)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 3 and all(type(m) is BatchNorm1d and m.activation is None for m in norms)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    plain_linears = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    assert all(lin.bias is None for lin in linears[:-1]) and linears[-1].bias is not None
    assert all(lin.bias is not None for lin in plain_linears)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in net.modules()) == 3  # unfused: the probe watches one
    for a, b in zip(linears, plain_linears):
        torch.testing.assert_close(a.weight, b.weight)  # same starting point


def test_cli_runs_and_rejects_bad_data(real_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["mnist", "--steps", "40", "--eval-every", "20", "--device", "cpu", "--standardize",
                 "--data-dir", str(real_dir), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "test acc @ 40 (final)" in err and str(out / "figure1.png") in err
    assert (out / "table.md").read_text().count("test acc @ 40 (final)") == 1
    assert json.loads((out / "config.json").read_text())["config"]["standardize"] is True
    assert main(["mnist", "--resume", "--out", str(out), "--lr", "0.1"]) == 2  # conflicting flag
    assert "lr" in capsys.readouterr().err

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in D.FILES.values():
        (bad / f"{name}.gz").write_bytes((real_dir / f"{name}.gz").read_bytes())
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x00\x00\x08\x01\x00\x00\x27\x10")  # header only
    assert main(["mnist", "--steps", "5", "--data-dir", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "t10k-labels-idx1-ubyte.gz" in capsys.readouterr().err


def test_python_dash_m_normlab():
    res = subprocess.run([sys.executable, "-m", "normlab", "mnist", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "--engine" in res.stdout and "--resume" in res.stdout


def test_cli_version(capsys):
    import normlab

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"normlab {normlab.__version__}"


# sha256 of metrics.jsonl of `normlab mnist --quick` on the real MNIST files, as written by the code before the lab
# moved onto the experiment skeleton (commit bbc72f8, 2026-11-29) and by this one. The numbers depend on the norm
# backend (pinned below: the numba loops, what `auto` picks on a CPU), on torch's CPU kernels (torch 2.13.0+cpu,
# one thread per network, which the run pins) and on the CPU's instruction set; a change of any of them can
# change the last digits. The worker count does not (tested above).
QUICK_SHA256 = "05fcea9400482d409d3906e6575a602a6df88c9a434e2cd119077fc23ce6bf95"


def test_quick_run_metrics_are_byte_identical_to_the_reference(real_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NORMLAB_BACKEND", "numba")
    out = tmp_path / "quick"
    meta = run_quick("mnist", real_dir, out)
    assert hashlib.sha256((out / "metrics.jsonl").read_bytes()).hexdigest() == QUICK_SHA256
    assert meta["command"][-3:-1] == ["--out", str(out)]
    table = (out / "table.md").read_text()
    assert "Quick run" in table and "≈ 0.96-0.97 / ≈ 0.98" in table and "Median range" in table
    assert table.strip() in capsys.readouterr().err  # the table printed is the one saved
