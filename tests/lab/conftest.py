"""Fixtures of the lab's tests: the real MNIST folder and small IDX files built in memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def mnist_dir() -> Path:
    """The real files: ``$NORMLAB_DATA``, else ``../shared/data/mnist`` beside the repo (as CI lays it out)."""
    return Path(os.environ.get("NORMLAB_DATA") or REPO.parent / "shared" / "data" / "mnist")


@pytest.fixture(scope="session")
def real_dir() -> Path:
    d = mnist_dir()
    if not (d / "train-images-idx3-ubyte.gz").is_file() and not (d / "train-images-idx3-ubyte").is_file():
        pytest.fail(f"the MNIST files are not in {d}: set NORMLAB_DATA to the folder that holds them")
    return d


def idx_bytes(arr: np.ndarray, magic: bytes | None = None) -> bytes:
    """The IDX encoding of a uint8 array (header: magic 0x0000080<ndim>, then big-endian int32 dims)."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    return magic + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()
