"""The model file: the one place that writes and reads checkpoints and ``final_model.pt``.

Writes are atomic, so a crash mid-write never replaces the last good file. A model file holds
plain tensors and values only (no pickled objects): the state dict, the round, the model
preset, the class vocabulary and the composed config as YAML text.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from common.errors import JobError
from common.model import MCTFormerV2, create_mct_model

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


class CheckpointError(JobError):
    """A model file that is missing, unreadable or does not fit the run's config."""


MODEL_KEYS = frozenset({"state_dict", "round", "model", "classes"})


def model_payload(
    state_dict: Mapping[str, torch.Tensor], cfg: DictConfig, server_round: int
) -> dict[str, Any]:
    """Everything needed to rebuild the model later, without pickled objects."""
    return {
        "state_dict": dict(state_dict),
        "round": server_round,
        "model": OmegaConf.to_container(cfg.model),
        "classes": list(cfg.data.classes),
        "config": OmegaConf.to_yaml(cfg),
    }


def save_model(
    state_dict: Mapping[str, torch.Tensor], cfg: DictConfig, server_round: int, path: Path
) -> Path:
    """Write a model file (a round checkpoint or ``final_model.pt``) atomically."""
    return save_atomic(model_payload(state_dict, cfg, server_round), path)


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The payload of a model file, or a :class:`CheckpointError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint={path}: file not found")
    try:
        payload = load_checkpoint(path)
    except Exception as error:  # torch raises several types for a damaged or foreign file
        raise CheckpointError(f"checkpoint={path} is unreadable: {error}") from error
    if not isinstance(payload, dict) or not payload.keys() >= MODEL_KEYS:
        raise CheckpointError(f"checkpoint={path} is not an MCT model file (final_model.pt)")
    return payload


def check_model_name(payload: Mapping[str, Any], path: Path, expected: str) -> None:
    """Refuse a model file of another preset than the config asks for."""
    if payload["model"]["name"] != expected:
        raise CheckpointError(
            f"{path} holds a {payload['model']['name']} model, the config asks for {expected}"
        )


def load_model(
    path: str | Path, classes: list[str] | None = None
) -> tuple[MCTFormerV2, dict[str, Any]]:
    """Rebuild the trained MCT model from its file, in eval mode.

    ``classes``, when given, must be the class vocabulary the model was trained on: a model
    applied to another vocabulary would silently mislabel every cell.
    """
    payload = read_model_file(path)
    trained_on = list(payload["classes"])
    if classes is not None and trained_on != list(classes):
        raise CheckpointError(
            f"the checkpoint was trained on classes {trained_on} but the data config has "
            f"{list(classes)}; pick the data config the model was trained with"
        )
    model_cfg = {**payload["model"], "pretrained_file": None}  # the weights come from the file
    model = create_mct_model(model_cfg, num_classes=len(trained_on))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint={path}: weights do not fit its model: {error}"
        ) from error
    return model.eval(), payload


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
