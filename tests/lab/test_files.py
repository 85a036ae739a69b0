"""Atomic, durable writes: normlab.lab.files.atomic_write and every lab file written through it."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch

from normlab.lab import data as D
from normlab.lab import files
from normlab.lab.plots import plot_run


@pytest.fixture
def events(monkeypatch):
    """Records the order of os.fsync and os.replace calls (both still do their work)."""
    log = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (log.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (log.append(("replace", os.fspath(b))), replace(a, b))[1])
    return log


def _fsynced_before_replace(log, path) -> bool:
    """True when ``path`` was replaced once, with a file fsync since the previous replace."""
    i = log.index(("replace", os.fspath(path)))
    prior = [e for e in log[:i] if e == "fsync" or isinstance(e, tuple)]
    return bool(prior) and prior[-1] == "fsync"


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_durably_and_returns(tmp_path, events):
    path = tmp_path / "a.txt"
    path.write_text("old")
    assert files.atomic_write(path, lambda f: f.write(b"new")) == 3
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _fsynced_before_replace(events, path)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path, exc):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def write(f):
        f.write(b"half of the new")
        raise exc

    with pytest.raises(exc):
        files.atomic_write(path, write)
    assert path.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_write_concurrent_writers_do_not_share_a_temp_file(tmp_path):
    path = tmp_path / "a.txt"

    def outer(f):
        f.write(b"outer")
        files.atomic_write(path, lambda g: g.write(b"inner"))  # a second writer while the first is mid-write

    files.atomic_write(path, outer)
    assert path.read_text() == "outer"  # the last replace wins; neither write tore the other
    assert _leftovers(tmp_path) == []


def test_write_text_and_torch_save_go_through_atomic_write(tmp_path, events):
    files.write_text(tmp_path / "m.json", json.dumps({"a": 1}))
    files.atomic_write(tmp_path / "c.pt", lambda f: torch.save({"step": 3, "t": torch.arange(3)}, f))
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3
    assert _fsynced_before_replace(events, tmp_path / "m.json")
    assert _fsynced_before_replace(events, tmp_path / "c.pt")
    assert _leftovers(tmp_path) == []


def test_writable_dir_creates_and_refuses_in_one_line(tmp_path):
    assert files.writable_dir(tmp_path / "a" / "b") is True and (tmp_path / "a" / "b").is_dir()
    assert files.writable_dir(tmp_path / "a" / "b") is False
    (tmp_path / "f").write_text("a file")
    with pytest.raises(ValueError, match=r"cannot create the run folder .*f/x: a file is in the way"):
        files.writable_dir(tmp_path / "f" / "x", "the run folder")
    with pytest.raises(ValueError, match="a file is in the way"):
        files.writable_dir(tmp_path / "f", "the run folder")


def _fake_run(folder, n=4):
    folder.mkdir()
    rec = lambda s, v: {"train_loss": None, "test_loss": 1.0, "test_acc": 0.1 + 0.2 * s + 0.1 * v,
                        "p15": -1.0 - s, "p50": 0.0, "p85": 1.0 + s}
    lines = [json.dumps({"step": 100 * s, "plain": rec(s, 0), "bn": rec(s, 1)}) for s in range(n)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "config.json").write_text(json.dumps({"experiment": "mnist", "config": {"steps": 100 * (n - 1)}}))
    return folder


def test_plot_is_written_atomically_with_a_private_temp_file(tmp_path, events):
    run_dir = _fake_run(tmp_path / "run")
    # The temporary name the plot used to use, held by another writer: it must be left alone.
    other = run_dir / ".figure1.png.tmp.png"
    other.write_bytes(b"another plot, half written")
    path = plot_run(run_dir)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert other.read_bytes() == b"another plot, half written"
    assert _fsynced_before_replace(events, path)
    assert _leftovers(run_dir) == [other.name]


def test_plot_format_follows_the_suffix(tmp_path):
    run_dir = _fake_run(tmp_path / "run")
    assert plot_run(run_dir, tmp_path / "f.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert plot_run(run_dir, tmp_path / "f.img").read_bytes()[:4] == b"\x89PNG"  # unknown suffix: PNG


def test_make_sample_is_atomic(tmp_path, events, monkeypatch):
    rng = np.random.default_rng(0)
    full = D.MNIST(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50, dtype=np.uint8),
                   rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), rng.integers(0, 10, 20, dtype=np.uint8),
                   source="files", location="x")
    monkeypatch.setattr(D, "read_folder", lambda src: full)
    out = D.make_sample("unused", tmp_path / "s.npz", n_train=10, n_test=5)
    assert D.load_sample(out).train_images.shape == (10, 28, 28)
    assert _fsynced_before_replace(events, out)
    assert _leftovers(tmp_path) == []
