"""Reading a run folder: the one reader the runner, ``normlab plot`` and the report share.

A run folder holds ``config.json`` (the experiment's name, the exact command, the resolved configuration, the data
source, versions and host), ``metrics.jsonl`` (one record per evaluation), ``summary.json``, ``table.md``, the figure
and ``checkpoint.pt``. Every problem with them is a :class:`RunError` (a ``ValueError``) with a one-line message
that names the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG, METRICS, SUMMARY, TABLE = "config.json", "metrics.jsonl", "summary.json", "table.md"
CHECKPOINT = "checkpoint.pt"


class RunError(ValueError):
    """A run folder, or one of its files, is missing or unreadable; the message names it."""


def _json(path: Path, text: str, line: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {line}" if line is not None else f"line {e.lineno} column {e.colno}"
        raise RunError(f"{path} is not valid JSON at {where} ({e.msg}); restore it or start a new run") from None


class RunFolder:
    """A run folder at ``path`` (which may not exist yet): its files' paths and their parsed contents."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config_path = self.path / CONFIG
        self.metrics_path = self.path / METRICS
        self.summary_path = self.path / SUMMARY
        self.table_path = self.path / TABLE
        self.checkpoint_path = self.path / CHECKPOINT
        self._meta: dict | None = None

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def exists(self) -> bool:
        """Whether the folder holds a run (its config.json)."""
        return self.config_path.is_file()

    def meta(self) -> dict:
        """config.json, parsed (read once)."""
        if self._meta is None:
            if not self.config_path.is_file():
                raise RunError(f"{self.path} holds no run (no {CONFIG})")
            meta = _json(self.config_path, self.config_path.read_text())
            if not isinstance(meta, dict):
                raise RunError(f"{self.config_path} should hold a JSON object, got {type(meta).__name__}")
            self._meta = meta
        return self._meta

    def config(self) -> dict:
        """The resolved configuration: config.json's ``config`` entry."""
        meta = self.meta()
        if not isinstance(meta.get("config"), dict):
            raise RunError(f"{self.config_path} has no 'config' entry (keys: {', '.join(meta) or 'none'}); it was "
                           "not written by normlab, or was edited")
        return meta["config"]

    def experiment(self) -> str:
        """The experiment's name (runs written before the registry are Figure 1's: ``"mnist"``)."""
        return self.meta().get("experiment", "mnist")

    def is_sample(self) -> bool:
        """Whether the run trained on the shipped sample instead of MNIST."""
        return self.meta().get("data", {}).get("source") == "sample"

    def is_quick(self) -> bool:
        """Whether the run is a ``--quick`` one."""
        return bool(self.meta().get("quick", False))

    def records(self) -> list[dict]:
        """The records of metrics.jsonl, in order; an empty file is an error."""
        if not self.metrics_path.is_file():
            raise RunError(f"{self.path} has no {METRICS}")
        with open(self.metrics_path) as f:
            records = [_json(self.metrics_path, line, i) for i, line in enumerate(f, 1) if line.strip()]
        if not records:
            raise RunError(f"{self.metrics_path} holds no records")
        return records

    def summary(self) -> dict:
        """summary.json, parsed."""
        if not self.summary_path.is_file():
            raise RunError(f"{self.path} has no {SUMMARY} (the run has not finished)")
        return _json(self.summary_path, self.summary_path.read_text())
