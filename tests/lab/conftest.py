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
