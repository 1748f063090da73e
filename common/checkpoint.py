"""Atomic checkpoints: a crash mid-write never replaces the last good file."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def save_atomic(payload: Mapping[str, Any], path: Path) -> Path:
    """Write ``payload`` with torch.save to a temporary file beside ``path``, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``round_*.pt`` in ``directory`` that loads, skipping unreadable ones.

    A file cut short by a crash or a full disk (atomic writes make this rare, copies and
    restores do not) is logged and passed over for the one before it.
    """
    for path in sorted(directory.glob("round_*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except Exception as error:  # torch raises several types for a damaged file
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
    return None
