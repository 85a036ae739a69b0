"""The benchmark scripts still run (smoke runs, no timing asserted): CI has no GPU, so this is what keeps
benchmarks/gpu.py from rotting between the sessions that get one."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_cpu_benchmark_runs(tmp_path):
    out = tmp_path / "cpu.json"
    run = _run(["benchmarks/cpu.py", "--quick", "--threads", "1", "--json", str(out)], tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 12 and {r["layer"] for r in rows} == {"BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm",
                                                              "InstanceNorm2d"}
    assert all(r["train_torch_ms"] > 0 and r["train_normlab_ms"] > 0 and r["eval_normlab_ms"] > 0 for r in rows)
    assert all(r["max_diff"] < 1e-4 for r in rows)  # each row checked its outputs first
    assert len(result["summary"]) == 4 and result["header"]["commit"]


def test_tiers_script_runs(tmp_path):
    run = _run(["benchmarks/tiers.py", "--steps", "5"], tmp_path)
    assert run.returncode == 0, run.stderr
    assert "native.norm step" in run.stdout and "aten_ops.norm step" in run.stdout and "loops stubbed" in run.stdout


def test_crossover_script_runs(tmp_path):
    run = _run(["benchmarks/crossover.py", "--quick"], tmp_path)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert len(rows) == 4 and all(float(c) > 0 for r in rows for c in r.strip("| ").split(" | ")[2:])


def test_gpu_benchmark_dry_run(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu.json"
    run = _run(["benchmarks/gpu.py", "--dry-run", str(out)], tmp_path, TRITON_INTERPRET="1", NORMLAB_BACKEND="triton")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "0 case(s) failed the correctness check" in run.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {(r["kind"], r["mode"]) for r in rows} == {("batch", "train"), ("batch", "eval"), ("group", "train"),
                                                      ("layer", "train")}
    assert {(r["dtype"], r["layout"]) for r in rows if r["kind"] == "batch"} >= {
        ("bf16", "NCHW"), ("bf16", "NHWC"), ("fp32", "NCHW"), ("fp32", "NHWC"), ("bf16", "NC"), ("fp32", "NC")}
    # the bandwidth the floor uses is measured in the run, and labelled as no GPU figure on the dry run
    assert result["device"] == "cpu (dry run)" and result["gpu"] is None
    assert result["copy_bandwidth_bytes_per_s"] > 0 and "not a GPU figure" in result["copy_bandwidth_what"]
    assert "not a GPU figure" in run.stdout
    assert set(result["timers"]) == {"back_to_back", "flushed"} and result["targets_use"].startswith("back_to_back")
    assert result["commit"] and result["date"] and result["skipped"] == []
    assert len(result["checks"]) == len(rows) and all(c["check_ok"] for c in result["checks"])
    for r in rows:
        peers = {"cudnn", "native", "compile"} if r["kind"] == "batch" else {"eager", "compile"}
        assert set(r["peers_ms"]) == peers and r["best_peer"] in peers and r["input_sets"] == 2
        for t in [r["normlab_ms"], *r["peers_ms"].values()]:
            assert t["back_to_back"] > 0 and t["flushed"] > 0
        assert set(r["check_err_over_tol"]) == ({"y", "dx", "dw", "db"} if r["mode"] == "train" else {"y"})
        passes = 5 if r["mode"] == "train" else 2
        nbytes = math.prod(r["shape"]) * (2 if r["dtype"] == "bf16" else 4)
        floor_ms = passes * nbytes / result["copy_bandwidth_bytes_per_s"] * 1e3
        assert r["floor_ms"] == pytest.approx(floor_ms)
        assert r["pct_of_floor"] == pytest.approx(100 * floor_ms / r["normlab_ms"]["back_to_back"])
        best = r["peers_ms"][r["best_peer"]]["back_to_back"]
        assert best == min(t["back_to_back"] for t in r["peers_ms"].values())
        assert r["best_peer_over_normlab"] == pytest.approx(best / r["normlab_ms"]["back_to_back"])
    assert len(result["summary"]) == 4 and all(("holds" in s) != ("MISSED" in s) for s in result["summary"])


def _gpu_script(monkeypatch):
    """benchmarks/gpu.py as a module (it imports benchmarks/cpu.py as a sibling, as when run as a script)."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_fails_a_wrong_dw(monkeypatch):
    """The dw check passes float32 rounding on a real-sized sum and fails a wrong dw, however many values it sums."""
    gpu = _gpu_script(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(64, 8, 32, 32, dtype=torch.float64).mul_(2.0).add_(0.5)
    w, b, dy = torch.rand(8, dtype=torch.float64) + 0.5, torch.randn(8, dtype=torch.float64), torch.randn_like(x)
    m = x.numel() // 8  # each dw entry sums 65536 values

    def dw(dtype):
        xs, ws, bs = (t.to(dtype).requires_grad_() for t in (x, w, b))
        y = F.relu(F.batch_norm(xs, None, None, ws, bs, training=True))
        return torch.autograd.grad(y, ws, dy.to(dtype))[0]

    dw32, dw64 = dw(torch.float32), dw(torch.float64)
    assert gpu.err_over_tol(dw32, dw64, torch.float32, m) <= 1.0  # float32 summation error passes
    assert gpu.err_over_tol(dw32 * 1.01, dw64, torch.float32, m) > 1.0  # a 1% scale error fails
    assert gpu.err_over_tol(dw32 * 0.99, dw64, torch.float32, m) > 1.0
    # one channel missing one sample's share of the sum, as an off-by-one in a tile loop's bounds would give
    xhat = (x - x.mean((0, 2, 3), keepdim=True)) * (x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).rsqrt()
    dz = dy * (xhat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1) > 0)
    assert torch.allclose((dz * xhat).sum((0, 2, 3)), dw64)
    short = dw32.clone()
    short[3] -= (dz * xhat)[0, 3].sum().float()  # one of 64 samples: ~1/64 of the entry, 1024 of its 65536 values
    assert gpu.err_over_tol(short, dw64, torch.float32, m) > 1.0
    poisoned = dw32.clone()
    poisoned[5] = float("nan")
    assert not gpu.err_over_tol(poisoned, dw64, torch.float32, m) <= 1.0  # NaN fails the script's "<= 1" test
