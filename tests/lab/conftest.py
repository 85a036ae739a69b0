"""Fixtures of the lab's tests: the real MNIST folder and small IDX files built in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from normlab.lab import data as D


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The real MNIST files, where the lab itself looks for them: ``$NORMLAB_DATA``, else the user cache.

    Fails (not skips) when they are absent: the lab's tests are on the real data. ``make test`` points
    ``NORMLAB_DATA`` at ``../shared/data/mnist`` when that folder exists.
    """
    d = D.resolve_data_dir()
    missing = [name for name in D.FILES.values() if D.find_file(d, name) is None]
    if missing:
        pytest.fail(f"the MNIST files are not in {d} (missing: {', '.join(missing)}); set NORMLAB_DATA to the "
                    "folder that holds them (make test uses ../shared/data/mnist)")
    return d


def idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    """The IDX encoding of a uint8 array (header: magic 0x0000080<ndim>, then big-endian int32 dims)."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    return magic + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def run_quick(name: str, real_dir: Path, out: Path, *flags: str) -> dict:
    """Run ``normlab NAME --quick`` on the real data into ``out`` (in this process, on the CPU), check what every
    run folder must hold, and return its config.json. An experiment's test calls it, then checks its numbers."""
    from normlab.lab import cli, registry
    from normlab.lab.experiment import units
    from normlab.lab.rundir import RunFolder

    assert cli.main([name, "--quick", "--device", "cpu", "--data-dir", str(real_dir), "--out", str(out),
                     "--no-progress", *flags]) == 0
    exp, run = registry.get(name), RunFolder(out)
    meta = run.meta()
    assert meta["experiment"] == name and meta["quick"] is True and meta["command"][-len(flags) - 1] == "--no-progress"
    assert meta["data"]["source"] == "files"
    cfg = exp.config(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    records = run.records()
    every = cfg.eval_every
    assert [r["step"] for r in records] == sorted({0, *range(every, cfg.steps, every), cfg.steps})
    keys = [k for k, _, _ in units(exp, cfg)]
    assert all(list(r) == ["step", *keys] for r in records)
    assert run.summary()["experiment"] == name
    table = run.table_path.read_text()
    assert table.startswith(f"## {exp.title}") and "Quick run" in table
    assert (out / exp.figure_name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run.checkpoint_path.is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left over
    return meta
