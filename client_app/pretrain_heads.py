"""A hospital's private pretraining head kept on its own disk, so that a resumed run continues it.

The head (an instance head has one row per local image, a pixel decoder redraws the crops)
never leaves the site. Between rounds it lives in the ClientApp's node state, which a run
killed in its pretraining phase loses with its processes. So each round's head is also
written under ``site_state_dir`` on the hospital's own machine, keyed by the run's
``output_dir`` (only a run with one can be resumed) and the hospital, and read back when
``resume=true`` continues the phase. The files go when the hospital's MCT rounds start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig

from common.checkpoint import load_checkpoint, prune_rounds, round_files, save_atomic

log = logging.getLogger(__name__)

# The server keeps its two newest checkpoints (server_app/recorder.py); the head after each of
# them must be at hand, and the site may be a round ahead of the last checkpoint.
HEADS_KEPT = 3


def head_directory(cfg: DictConfig, hospital: str) -> Path | None:
    """Where ``hospital`` keeps its heads for this run; None for a run that cannot be resumed."""
    if not cfg.output_dir:
        return None
    run_key = hashlib.sha256(str(cfg.output_dir).encode()).hexdigest()[:16]
    return Path(cfg.site_state_dir) / "pretrain-heads" / run_key / hospital


def save_head(directory: Path, server_round: int, state: Mapping[str, torch.Tensor]) -> None:
    """Write the head after ``server_round`` atomically; drop all but the newest few.

    A folder that cannot be written (a read-only file system, a full disk) costs only the
    exact resume, not the round: it is logged, and a resumed run starts a fresh head.
    """
    try:
        save_atomic(
            {"round": server_round, "state_dict": dict(state)}, _path(directory, server_round)
        )
        prune_rounds(directory, "round_", server_round, HEADS_KEPT)
    except OSError as error:
        log.warning(
            "cannot keep the pretraining head on this site's disk (%s); a resumed run would "
            "start a fresh one (set site_state_dir or W3S_SITE_STATE to a writable folder)",
            error,
        )


def latest_head(directory: Path, up_to: int) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The newest readable head this hospital kept up to round ``up_to``, with its round.

    A hospital that failed the round before a resume has no head of that round: its last is
    older, and is what its node state would have held. A later head belongs to a round the
    resumed run redoes. A damaged file is logged and passed over for the one before it.
    """
    for server_round, path in reversed(round_files(directory)):
        if server_round > up_to:
            continue
        try:
            return server_round, dict(load_checkpoint(path)["state_dict"])
        except Exception as error:  # torch raises several types for a damaged file
            log.warning("pretraining head %s is unreadable (%s)", path, error)
    return None


def forget_heads(directory: Path) -> None:
    """Remove this hospital's heads of the run, and each folder above them that is left empty.

    ``pretrain-heads`` itself goes once no run has heads in it, so finished runs leave nothing
    behind in ``site_state_dir``.
    """
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        # The other hospitals and runs share these folders and may be removing theirs; a
        # folder that still holds something stays.
        with contextlib.suppress(OSError):
            directory.parent.rmdir()
            directory.parent.parent.rmdir()


def _path(directory: Path, server_round: int) -> Path:
    return directory / f"round_{server_round:03d}.pt"
