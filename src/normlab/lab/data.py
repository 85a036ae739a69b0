"""MNIST for the lab: read the four IDX files, download them when missing, fall back to a shipped sample.

Where the files are looked for, first match wins: the ``data_dir`` argument (``--data-dir``), ``$NORMLAB_DATA``,
then the user cache ``$XDG_CACHE_HOME/normlab/mnist`` (``~/.cache/normlab/mnist``). Each file may be gzip-compressed
(``train-images-idx3-ubyte.gz``) or raw (``train-images-idx3-ubyte``).

When a file is missing it is downloaded from the public mirrors in :data:`MIRRORS`, one after the other, checked
against the MD5 of the unpacked original (:data:`MD5`), and moved into place (by
:func:`normlab.lab.files.atomic_write`) only once it is whole, correct and on disk: an interrupted or corrupt
download leaves nothing behind. When nothing can be downloaded, the small sample in
``normlab/lab/sample/mnist_sample.npz`` is used instead, with a loud warning: numbers measured on it are not the
paper's. Every error about a file's content names the file (or the URL it came from).

Images are returned as uint8 ``(N, 28, 28)`` and labels as uint8 ``(N,)``; :func:`to_inputs` turns images into the
float32 ``(N, 784)`` network inputs, optionally standardized per pixel with training-set statistics.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normlab.lab.files import atomic_write

# The four files, by role; the names are those of the original distribution.
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# MD5 of the unpacked files: mirrors re-compress, so the .gz bytes differ while the content does not.
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Tried in order; each serves ``<name>.gz``. yann.lecun.com is last because it often refuses automated clients.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)

SAMPLE_PATH = Path(__file__).parent / "sample" / "mnist_sample.npz"
SAMPLE_WARNING = (
    "!! MNIST could not be found or downloaded: using the small sample shipped with normlab "
    "({n_train} training, {n_test} test images).\n"
    "!! Results on the sample are NOT the paper's experiment. Put the four MNIST files in --data-dir, "
    "$NORMLAB_DATA or {cache} to run the real one."
)

_IDX_MAGIC = {1: "labels (magic 0x00000801)", 3: "images (magic 0x00000803)"}


class MnistFormatError(ValueError):
    """A file that should hold MNIST in IDX format does not; the message names the file."""


class DownloadError(RuntimeError):
    """None of the mirrors gave a correct copy of a file."""


@dataclass
class MNIST:
    """The data set: uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)`` for train and test.

    ``source`` is ``"files"`` for the real files (``location`` is their folder) or ``"sample"`` for the shipped
    sample (``location`` is the .npz).
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str
    location: str


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    """The user cache folder for MNIST: ``$XDG_CACHE_HOME/normlab/mnist`` or ``~/.cache/normlab/mnist``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normlab" / "mnist"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder MNIST is read from: ``data_dir``, else ``$NORMLAB_DATA``, else :func:`cache_dir`."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("NORMLAB_DATA")
    if env:
        return Path(env).expanduser()
    return cache_dir()


def find_file(folder: Path, name: str) -> Path | None:
    """The path of ``name.gz`` or ``name`` in ``folder``, whichever exists first, else None."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _unpack(raw: bytes, where: str) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise MnistFormatError(f"{where}: not a readable gzip file ({e}); it is truncated or corrupt") from e


def parse_idx(data: bytes, where: str) -> np.ndarray:
    """Parse unpacked IDX bytes into a uint8 array of the header's shape; ``where`` names the source in errors.

    Accepts the two MNIST layouts: labels ``(N,)`` (magic 0x00000801) and images ``(N, 28, 28)`` (magic 0x00000803).
    """
    if len(data) < 8:
        raise MnistFormatError(f"{where}: {len(data)} bytes, too short for an IDX header (expected at least 8)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or ndim not in _IDX_MAGIC:
        raise MnistFormatError(
            f"{where}: wrong magic number 0x{data[:4].hex()}; expected MNIST {' or '.join(_IDX_MAGIC.values())}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise MnistFormatError(f"{where}: header truncated ({len(data)} bytes, expected {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and shape[1:] != (28, 28):
        raise MnistFormatError(f"{where}: images of {shape[1]}x{shape[2]} pixels, expected 28x28")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        state = "truncated" if len(data) < expected else "too long"
        raise MnistFormatError(f"{where}: {state}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a uint8 array: images ``(N, 28, 28)`` or labels ``(N,)``."""
    path = Path(path)
    return parse_idx(_unpack(path.read_bytes(), str(path)), str(path))


def _check_pair(images: np.ndarray, labels: np.ndarray, img_path: str, lbl_path: str) -> None:
    if images.ndim != 3:
        raise MnistFormatError(f"{img_path}: holds labels {images.shape}, expected images (N, 28, 28)")
    if labels.ndim != 1:
        raise MnistFormatError(f"{lbl_path}: holds images {labels.shape}, expected labels (N,)")
    if len(images) != len(labels):
        raise MnistFormatError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise MnistFormatError(f"{lbl_path}: label {int(labels.max())} found, expected digits 0-9")


def read_folder(folder: str | os.PathLike) -> MNIST:
    """Read the four files from ``folder``; raises FileNotFoundError naming the missing ones."""
    folder = Path(folder)
    paths = {role: find_file(folder, name) for role, name in FILES.items()}
    missing = [FILES[role] for role, p in paths.items() if p is None]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(f'{m}[.gz]' for m in missing)}")
    arrays = {role: read_idx(p) for role, p in paths.items()}
    for split in ("train", "test"):
        _check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                    str(paths[f"{split}_images"]), str(paths[f"{split}_labels"]))
    return MNIST(**arrays, source="files", location=str(folder))


def _fetch_one(name: str, dest: Path, mirrors: Sequence[str], timeout: float, log: Callable[[str], None]) -> Path:
    """Download ``name.gz`` into ``dest`` from the first mirror that gives a correct copy; returns its path."""
    final = dest / f"{name}.gz"
    errors = []

    def fetch(url: str, out) -> None:
        """Stream ``url`` into ``out``, then check it; raising leaves nothing behind (see atomic_write)."""
        chunks = []
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                chunks.append(chunk)
        raw = b"".join(chunks)
        if expected is not None and len(raw) != int(expected):
            raise DownloadError(f"{url}: connection closed after {len(raw)} of {expected} bytes")
        data = _unpack(raw, url)
        digest = hashlib.md5(data).hexdigest()
        if digest != MD5[name]:
            raise MnistFormatError(f"{url}: MD5 {digest} of the unpacked file, expected {MD5[name]}")
        parse_idx(data, url)
        if raw[:2] != b"\x1f\x8b":  # a mirror that serves it unpacked: keep the .gz name honest
            out.seek(0)
            out.truncate()
            out.write(gzip.compress(data))

    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{name}.gz"
        log(f"normlab: downloading {url}")
        try:
            atomic_write(final, lambda out, url=url: fetch(url, out))
        except Exception as e:  # any failure of one mirror means: try the next
            errors.append(f"{url}: {e}")
            log(f"normlab: failed: {e}")
            continue
        log(f"normlab: verified and saved {final}")
        return final
    raise DownloadError(f"could not download {name}.gz:\n  " + "\n  ".join(errors))


def download_mnist(dest: str | os.PathLike, mirrors: Sequence[str] = MIRRORS, timeout: float = 30.0,
                   log: Callable[[str], None] = _log) -> None:
    """Download the files missing from ``dest`` (verified, written atomically); raises DownloadError if one fails."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES.values():
        if find_file(dest, name) is None:
            _fetch_one(name, dest, mirrors, timeout, log)


def load_sample(path: str | os.PathLike = SAMPLE_PATH) -> MNIST:
    """The small sample shipped with normlab (see :func:`make_sample`); errors name the file."""
    try:
        with np.load(path) as z:
            missing = [role for role in FILES if role not in z.files]
            if missing:
                raise MnistFormatError(f"{path}: no {', '.join(missing)} in the archive, expected {', '.join(FILES)}")
            arrays = {role: z[role] for role in FILES}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        if isinstance(e, MnistFormatError) or (isinstance(e, OSError) and e.filename is not None):
            raise  # names the file already
        raise MnistFormatError(f"{path}: not a readable .npz sample ({e})") from e
    for split in ("train", "test"):
        _check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], f"{path} [{split}_images]",
                    f"{path} [{split}_labels]")
    return MNIST(**arrays, source="sample", location=str(path))


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True, mirrors: Sequence[str] = MIRRORS,
               log: Callable[[str], None] = _log) -> MNIST:
    """MNIST from the resolved folder, downloading missing files, else the shipped sample (with a warning).

    Files that are present but malformed raise :class:`MnistFormatError` naming the file: a broken data set is
    a problem to fix, not one to paper over with the sample.
    """
    folder = resolve_data_dir(data_dir)
    missing = [name for name in FILES.values() if find_file(folder, name) is None]
    if missing and download:
        log(f"normlab: MNIST files missing from {folder}: {', '.join(missing)}")
        try:
            download_mnist(folder, mirrors=mirrors, log=log)
            missing = []
        except (DownloadError, OSError) as e:
            log(f"normlab: download failed: {e}")
    if not missing:
        return read_folder(folder)
    data = load_sample()
    log(SAMPLE_WARNING.format(n_train=len(data.train_labels), n_test=len(data.test_labels), cache=cache_dir()))
    return data


def make_sample(src_dir: str | os.PathLike, out: str | os.PathLike = SAMPLE_PATH, n_train: int = 5000,
                n_test: int = 1000, seed: int = 0) -> Path:
    """Write the shipped sample: a seeded random ``n_train``/``n_test`` subset of the real files, uint8, compressed."""
    full = read_folder(src_dir)
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(len(full.train_labels), n_train, replace=False))
    te = np.sort(rng.choice(len(full.test_labels), n_test, replace=False))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: np.savez_compressed(
        f, train_images=full.train_images[tr], train_labels=full.train_labels[tr],
        test_images=full.test_images[te], test_labels=full.test_labels[te]))
    return out


def standardization(train_images: np.ndarray, min_std: float = 1 / 255) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and std ``(784,)`` of the training images (scaled to [0, 1]), float32.

    The std is floored at ``min_std`` (one grey level): border pixels that are almost always 0 would otherwise
    divide by ~0 and turn a rare stroke in a test image into a huge input.
    """
    x = train_images.reshape(len(train_images), -1).astype(np.float64) / 255.0
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean.astype(np.float32), np.maximum(std, min_std).astype(np.float32)


def to_inputs(images: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Network inputs from uint8 images ``(N, 28, 28)``: float32 ``(N, 784)`` in [0, 1], or standardized by stats."""
    x = images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)
    if stats is not None:
        mean, std = stats
        x = (x - mean) / std
    return x


@dataclass
class Inputs:
    """What a network sees: float32 inputs ``(N, 784)`` and uint8 labels ``(N,)`` for train and test."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def prepare_inputs(ds: MNIST, standardize: bool = False) -> Inputs:
    """The network inputs of ``ds``: pixels / 255, or standardized per pixel with training-set statistics."""
    stats = standardization(ds.train_images) if standardize else None
    return Inputs(to_inputs(ds.train_images, stats), ds.train_labels, to_inputs(ds.test_images, stats), ds.test_labels)


class DataOrder:
    """The training rows of each step: epoch ``e`` visits ``permutation(seed, e)`` in batches, dropping the rest.

    A pure function of ``(seed, step)``: both networks, both engines and a resumed run see the same rows at the
    same step without sharing or saving any random state.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if not 1 <= batch_size <= n:
            raise ValueError(f"batch_size must be in [1, {n}] (the training set's size), got {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def indices(self, step: int) -> np.ndarray:
        """The ``(batch_size,)`` training-row indices of 0-based ``step``."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, 0, epoch]).permutation(self.n)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]

    def segment(self, start: int, end: int) -> np.ndarray:
        """The indices of steps ``start`` to ``end - 1``, stacked: ``(end - start, batch_size)``."""
        return np.stack([self.indices(s) for s in range(start, end)]) if end > start else np.empty((0, self.batch_size),
                                                                                                      dtype=np.int64)


if __name__ == "__main__":  # python -m normlab.lab.data SRC_DIR: rebuild the shipped sample from the real files
    src = sys.argv[1] if len(sys.argv) > 1 else resolve_data_dir()
    print(make_sample(src))
