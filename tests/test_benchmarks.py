"""The benchmark scripts still run (smoke runs, no timing asserted): CI has no GPU, so this is what keeps
benchmarks/gpu.py from rotting between the sessions that get one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "aten_ops.norm step" in run.stdout and "loops stubbed" in run.stdout


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
    rows = json.loads(out.read_text())["rows"]
    assert {r["kind"] for r in rows} >= {"batch", "group", "layer"}
