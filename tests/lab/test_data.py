"""MNIST loading: the real files, bad files, the download path (against a local HTTP server), the sample."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import idx_bytes

from normlab.lab import data as D

# ------------------------------------------------------------------------------------------------ the real files


@pytest.fixture(scope="module")
def real(real_dir):
    return D.read_folder(real_dir)


def test_real_files_shapes_and_checksums(real, real_dir):
    assert real.train_images.shape == (60000, 28, 28) and real.train_images.dtype == np.uint8
    assert real.train_labels.shape == (60000,) and real.test_images.shape == (10000, 28, 28)
    assert real.test_labels.shape == (10000,)
    assert sorted(np.unique(real.test_labels)) == list(range(10))
    assert real.source == "files"
    # The MD5 table is what downloads are checked against: it must match the originals.
    for name, md5 in D.MD5.items():
        unpacked = D._unpack(D.find_file(real_dir, name).read_bytes(), name)
        assert hashlib.md5(unpacked).hexdigest() == md5, name


def test_raw_and_gzip_read_the_same(tmp_path, real_dir, real):
    raw = gzip.decompress((real_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "t10k-labels-idx1-ubyte"), real.test_labels)


def test_resolve_data_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert D.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert D.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("NORMLAB_DATA")
    assert D.resolve_data_dir(None) == tmp_path / "cache" / "normlab" / "mnist"


def test_standardize_uses_training_statistics(real):
    mean, std = D.standardization(real.train_images)
    x = D.to_inputs(real.train_images, (mean, std))
    assert x.shape == (60000, 784) and x.dtype == np.float32
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    varying = std > 0.05
    np.testing.assert_allclose(x[:, varying].std(axis=0), 1.0, rtol=1e-3)
    plain = D.to_inputs(real.test_images)
    assert plain.min() == 0.0 and plain.max() == 1.0


# --------------------------------------------------------------------------------------------------- bad files


def _write_set(folder: Path, n=5, overrides=None):
    """A tiny well-formed MNIST folder (raw files), with some files replaced by ``overrides`` bytes."""
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, n)),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(rng.integers(0, 10, n)),
    }
    files.update(overrides or {})
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return files


def test_tiny_valid_set_loads(tmp_path):
    _write_set(tmp_path)
    ds = D.load_mnist(tmp_path, download=False)
    assert ds.source == "files" and ds.train_images.shape == (5, 28, 28)


_img = np.zeros((5, 28, 28), np.uint8)
_gz = gzip.compress(idx_bytes(np.random.default_rng(0).integers(0, 256, (5, 28, 28))), mtime=0)
BAD = {
    "corrupt gzip": ("train-images-idx3-ubyte.gz", _gz[:10] + b"\x00" * 5 + _gz[15:], "truncated or corrupt"),
    "wrong magic": ("train-images-idx3-ubyte", b"\x00\x00\x09\x03" + idx_bytes(_img)[4:], "wrong magic number"),
    "not idx at all": ("t10k-labels-idx1-ubyte", b"<html>Not Found</html>", "wrong magic number"),
    "truncated raw": ("train-images-idx3-ubyte", idx_bytes(_img)[:-100], "truncated"),
    "truncated gzip": ("train-images-idx3-ubyte.gz", gzip.compress(idx_bytes(_img))[:-30], "truncated or corrupt"),
    "too long": ("t10k-labels-idx1-ubyte", idx_bytes(np.zeros(5)) + b"\x00", "too long"),
    "wrong image size": ("t10k-images-idx3-ubyte", idx_bytes(np.zeros((5, 29, 28))), "expected 28x28"),
    "label/image count": ("train-labels-idx1-ubyte", idx_bytes(np.zeros(4)), "5 images but"),
    "labels where images go": ("t10k-images-idx3-ubyte", idx_bytes(np.zeros(5)), "expected images"),
    "label out of range": ("t10k-labels-idx1-ubyte", idx_bytes(np.full(5, 12)), "label 12"),
    "short header": ("t10k-labels-idx1-ubyte", b"\x00\x00\x08", "too short"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_rejected_by_name(tmp_path, case):
    name, content, message = BAD[case]
    overrides = {name: content}
    _write_set(tmp_path, overrides=overrides)
    if name.endswith(".gz"):  # the .gz is found before the raw file: remove the good raw one
        (tmp_path / name[:-3]).unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(D.MnistFormatError) as err:
        D.load_mnist(tmp_path, download=True, mirrors=["http://127.0.0.1:9/"])  # present files are never replaced
    assert name in str(err.value) and message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing cached, nothing deleted


# ------------------------------------------------------------------------------------------------- downloading


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        if self.path.startswith("/cut/"):  # announce the whole file, send half of it, hang up
            body = (Path(self.directory) / "good" / self.path[len("/cut/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path, real_dir):
    """A local mirror: /good/ serves the real label files, /bad/ corrupt copies, /cut/ half of each, /raw/ the
    unpacked files under the .gz names."""
    root = tmp_path / "www"
    for sub in ("good", "bad", "raw"):
        (root / sub).mkdir(parents=True)
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        good = (real_dir / f"{name}.gz").read_bytes()
        (root / "good" / f"{name}.gz").write_bytes(good)
        data = bytearray(gzip.decompress(good))
        (root / "raw" / f"{name}.gz").write_bytes(bytes(data))
        data[100] = (data[100] + 1) % 10  # one wrong label: a well-formed file with the wrong checksum
        (root / "bad" / f"{name}.gz").write_bytes(gzip.compress(bytes(data)))
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def half_present(tmp_path, real_dir):
    """A data folder with the two (large) image files in place and both label files missing."""
    dest = tmp_path / "data"
    dest.mkdir()
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        shutil.copy(real_dir / f"{name}.gz", dest)
    return dest


def test_download_tries_mirrors_and_verifies(server, half_present, real):
    log = []
    mirrors = [f"{server}/missing/", f"{server}/bad/", f"{server}/cut/", f"{server}/good/"]
    ds = D.load_mnist(half_present, mirrors=mirrors, log=log.append)
    assert ds.source == "files"
    np.testing.assert_array_equal(ds.train_labels, real.train_labels)
    np.testing.assert_array_equal(ds.test_labels, real.test_labels)
    text = "\n".join(log)
    assert f"{server}/missing/train-labels-idx1-ubyte.gz" in text and "404" in text
    assert "MD5" in text  # the corrupt copy was rejected by its checksum
    assert "connection closed after" in text  # and the cut one by its length
    assert f"verified and saved {half_present / 'train-labels-idx1-ubyte.gz'}" in text
    assert sorted(p.name for p in half_present.iterdir()) == sorted(f"{n}.gz" for n in D.FILES.values())


def test_download_of_unpacked_files_is_stored_gzipped_and_synced(server, half_present, real, monkeypatch):
    synced, fsync = [], D.os.fsync
    monkeypatch.setattr(D.os, "fsync", lambda fd: (synced.append(fd), fsync(fd))[1])
    D.download_mnist(half_present, mirrors=[f"{server}/raw/"], log=lambda m: None)
    path = half_present / "t10k-labels-idx1-ubyte.gz"
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # re-compressed: the .gz name tells the truth
    np.testing.assert_array_equal(D.read_idx(path), real.test_labels)
    assert len(synced) >= 2  # each downloaded file reached the disk before it was moved into place
    assert sorted(p.name for p in half_present.iterdir()) == sorted(f"{n}.gz" for n in D.FILES.values())


def test_failed_download_leaves_nothing(server, half_present):
    before = sorted(p.name for p in half_present.iterdir())
    with pytest.raises(D.DownloadError, match="train-labels-idx1-ubyte.gz"):
        D.download_mnist(half_present, mirrors=[f"{server}/bad/", f"{server}/cut/"], log=lambda m: None)
    assert sorted(p.name for p in half_present.iterdir()) == before  # no partial, no corrupt file


def test_interrupted_download_leaves_nothing(half_present, monkeypatch):
    class Stream:
        def __init__(self):
            self.n = 0

        def read(self, size):
            self.n += 1
            if self.n > 2:
                raise KeyboardInterrupt  # the user pressed Ctrl-C mid-download
            return b"\x1f\x8b" + b"x" * 100

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: Stream())
    before = sorted(p.name for p in half_present.iterdir())
    with pytest.raises(KeyboardInterrupt):
        D.download_mnist(half_present, mirrors=["http://example.invalid/"], log=lambda m: None)
    assert sorted(p.name for p in half_present.iterdir()) == before


def test_no_download_falls_back_to_sample_loudly(tmp_path, server):
    log = []
    ds = D.load_mnist(tmp_path / "empty", mirrors=[f"{server}/missing/"], log=log.append)
    assert ds.source == "sample"
    assert "NOT the paper's" in "\n".join(log)
    assert ds.train_images.shape[1:] == (28, 28) and ds.train_images.dtype == np.uint8
    assert len(ds.train_labels) >= 2000 and len(ds.test_labels) >= 500
    assert sorted(np.unique(ds.train_labels)) == list(range(10))
    assert not any((tmp_path / "empty").iterdir())  # nothing half-downloaded was kept


# ------------------------------------------------------------------------------------------------------ sample


def test_bad_sample_is_rejected_by_name(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip archive")
    with pytest.raises(D.MnistFormatError, match="junk.npz"):
        D.load_sample(junk)
    partial = tmp_path / "partial.npz"
    np.savez(partial, train_images=_img, train_labels=np.zeros(5, np.uint8))
    with pytest.raises(D.MnistFormatError, match=r"partial\.npz: no test_images, test_labels"):
        D.load_sample(partial)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        D.load_sample(tmp_path / "absent.npz")


def test_shipped_sample_is_small_and_reproducible(tmp_path, real_dir):
    assert D.SAMPLE_PATH.stat().st_size < 2_000_000
    shipped = D.load_sample()
    rebuilt = D.load_sample(D.make_sample(real_dir, tmp_path / "s.npz"))
    for role in D.FILES:
        np.testing.assert_array_equal(getattr(shipped, role), getattr(rebuilt, role), err_msg=role)
