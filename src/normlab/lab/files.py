"""The lab's one way to write a file: atomically and durably.

:func:`atomic_write` writes into a fresh temporary file in the destination's folder, flushes and fsyncs it, then
moves it over the destination with ``os.replace``. Readers, a crash, Ctrl-C or a power cut therefore find either
the previous complete file or the new complete one, never a torn one; two writers never share a temporary file
(the last ``os.replace`` wins); and the temporary file is removed on any failure, ``KeyboardInterrupt`` included.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the platform allows it (POSIX); best effort elsewhere."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], T], mode: int = 0o644) -> T:
    """Replace ``path`` with what ``write`` writes, atomically; returns what ``write`` returned.

    ``write`` gets the temporary file opened for binary writing (it may seek, truncate and stream into it). If
    it raises, anything does, the destination is left as it was and the temporary file is removed.

    Args:
        path: the destination; its folder must exist.
        write: called once with the open temporary file.
        mode: the permissions of the new file (``mkstemp`` makes it owner-only; data and results are for all).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return result


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def writable_dir(folder: str | os.PathLike, what: str = "folder") -> bool:
    """Make sure ``folder`` exists (creating it and its parents) and is writable; returns whether it was created.

    Raises ValueError with one line naming ``what`` and the folder when it cannot be created (no permission, a
    file in its path) or written.
    """
    folder = Path(folder)
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise ValueError(f"cannot create {what} {folder}: {reason}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write in {what} {folder}: permission denied")
    return not existed
