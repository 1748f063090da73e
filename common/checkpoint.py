"""The model file: the one place that writes and reads checkpoints and ``final_model.pt``.

Writes are atomic, so a crash mid-write never replaces the last good file. A model file holds
plain tensors and values only (no pickled objects): the state dict, the round, the model
preset, the class vocabulary and the composed config as YAML text.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.data.splits import SplitSpec
from common.files import synced_replacement
from common.localization import FOREGROUND_SOURCES
from common.model import MCTFormerV2, create_mct_model
from common.torch_files import CheckpointError, first_line, read_torch_file

log = logging.getLogger(__name__)


def save_atomic(payload: Mapping[str, Any], path: Path) -> Path:
    """Write ``payload`` with torch.save to a temporary file beside ``path``, fsync, then rename."""
    with synced_replacement(path, binary=True) as handle:
        torch.save(dict(payload), handle)
    return path


@dataclass(frozen=True)
class FileKind:
    """A kind of model file the commands read, told apart by the keys its payload has."""

    key: str  # the config key that names such a file
    keys: frozenset[str]
    title: str
    # What to do with a file of this kind that was given where the other kind belongs.
    hint: str


MODEL_FILE = FileKind(
    key="checkpoint",
    keys=frozenset({"state_dict", "round", "model", "classes"}),
    title="an MCT model file (final_model.pt)",
    hint="run w3s-postprocess checkpoint=<it> to train a segmenter and pass its segmenter.pt",
)
SEGMENTER_FILE = FileKind(
    key="segmenter",
    keys=frozenset({"state_dict", "segmenter", "classes"}),
    title="a segmenter file (segmenter.pt written by w3s-postprocess)",
    hint="w3s-predict takes it as segmenter=",
)


def model_payload(
    state_dict: Mapping[str, torch.Tensor],
    cfg: DictConfig,
    server_round: int,
    splits: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild the model later, without pickled objects.

    The tensors are moved to the CPU: a file written on a GPU would otherwise load only where
    one is, or with ``map_location``. ``splits`` holds each hospital's split fingerprints
    (``common.data.split_digest``) of the rounds that trained the model; post-training checks
    its own split against them.
    """
    return {
        "state_dict": {key: value.detach().cpu() for key, value in state_dict.items()},
        "round": server_round,
        "model": OmegaConf.to_container(cfg.model),
        "classes": list(cfg.data.classes),
        "config": OmegaConf.to_yaml(cfg),
        "splits": {name: [int(d) for d in digests] for name, digests in (splits or {}).items()},
    }


def save_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: DictConfig,
    server_round: int,
    path: Path,
    splits: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Write a model file (a round checkpoint or ``final_model.pt``) atomically."""
    return save_atomic(model_payload(state_dict, cfg, server_round, splits), path)


def describe_payload(payload: Any) -> str:
    """What a loaded file is, for messages that say what was given instead of what was wanted."""
    if isinstance(payload, torch.Tensor):
        return f"a bare tensor of shape {tuple(payload.shape)} (saved with torch.save)"
    if not isinstance(payload, Mapping):
        return f"a {type(payload).__name__}"
    if payload.keys() >= MODEL_FILE.keys:
        return "an MCT model file (final_model.pt or a round checkpoint)"
    if payload.keys() >= SEGMENTER_FILE.keys:
        return SEGMENTER_FILE.title
    if payload and all(isinstance(value, torch.Tensor) for value in payload.values()):
        return f"a bare state dict of {len(payload)} tensors, without the model's settings"
    keys = sorted(map(str, payload))
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"a dict with keys {shown or '(none)'}"


def weights_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any]) -> str:
    """One line on how ``given`` weights differ from a model's own state dict ("" if they fit)."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    shapes = [
        f"{key} {tuple(given[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in given
        and isinstance(given[key], torch.Tensor)
        and tuple(given[key].shape) != tuple(value.shape)
    ]
    not_tensors = [
        key for key in given if key in expected and not isinstance(given[key], torch.Tensor)
    ]
    # A damaged file's NaN weights gave NaN maps that the pseudo-mask methods turned into an
    # all-cell guess or an all-background mask without a word.
    not_finite = [
        key
        for key, value in given.items()
        if key in expected
        and isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("of another shape (file vs model)", shapes),
        ("not tensors", not_tensors),
        ("not finite (NaN or infinite values)", not_finite),
    ):
        if keys:
            parts.append(f"{len(keys)} {label}, e.g. {keys[0]}")
    return "; ".join(parts)


def load_weights(model: torch.nn.Module, state_dict: Any, where: str, what: str) -> None:
    """Load ``state_dict`` into ``model`` or raise a one-line :class:`CheckpointError`.

    Parameters
    ----------
    model
        The freshly built model.
    state_dict
        What the file holds under ``state_dict``.
    where
        ``key=path`` of the file, for the message.
    what
        The model the file says it holds, e.g. ``"mct_tiny_patch8_96"``.
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{where}: its state_dict is a {type(state_dict).__name__}")
    problem = weights_mismatch(model.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{where}: the weights do not fit a {what} model: {problem}")
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{where}: the weights do not fit a {what} model: {first_line(error)}"
        ) from None


def read_payload(path: str | Path, kind: FileKind) -> dict[str, Any]:
    """A model file's payload, checked to be ``kind`` with a list of class names.

    Any other content is a one-line :class:`CheckpointError` naming the file and saying what
    it holds instead.
    """
    where = f"{kind.key}={path}"
    payload = read_torch_file(path, kind.key)
    if not isinstance(payload, dict) or not payload.keys() >= kind.keys:
        other = next(
            (
                k
                for k in (MODEL_FILE, SEGMENTER_FILE)
                if k is not kind and isinstance(payload, Mapping) and payload.keys() >= k.keys
            ),
            None,
        )
        raise CheckpointError(
            f"{where} is not {kind.title}: it holds {describe_payload(payload)}"
            + (f"; {other.hint}" if other else "")
        )
    classes = payload["classes"]
    if (
        not isinstance(classes, list | tuple)
        or not classes
        or not all(isinstance(name, str) for name in classes)
    ):
        raise CheckpointError(f"{where}: its class list is not a list of names ({classes!r:.80})")
    return payload


def read_model_file(path: str | Path) -> dict[str, Any]:
    """The payload of an MCT model file, or a :class:`CheckpointError` that names the file."""
    payload = read_payload(path, MODEL_FILE)
    model = payload["model"]
    if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
        raise CheckpointError(
            f"checkpoint={path}: its model settings name no MCT preset ({model!r:.80})"
        )
    run_config(payload, path)
    return payload


def run_config(payload: Mapping[str, Any], path: str | Path) -> DictConfig | None:
    """The training run's config that a model file carries; None in files of early versions.

    Post-training reads its split and training settings; a damaged or hand-made one (no YAML,
    no mapping, a split it cannot draw, an interpolation it cannot resolve) is a one-line
    :class:`CheckpointError` naming the file, not a traceback mid-job.
    """
    text = payload.get("config")
    if not isinstance(text, str):
        return None
    try:
        cfg = OmegaConf.create(text)
        if not isinstance(cfg, DictConfig):
            raise ValueError(f"it holds a {type(cfg).__name__}, not the run's settings")
        SplitSpec.of(cfg.data)
        if "train" in cfg:  # the site's fine-tune reads it
            OmegaConf.to_container(cfg.train, resolve=True)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint={path}: its training config cannot be read: {first_line(error)}"
        ) from None
    return cfg


def check_model_name(payload: Mapping[str, Any], path: Path, expected: str) -> None:
    """Refuse a model file of another preset than the config asks for."""
    if payload["model"]["name"] != expected:
        raise CheckpointError(
            f"{path} holds a {payload['model']['name']} model, the config asks for {expected}"
        )


def load_model(
    path: str | Path,
    classes: list[str] | None = None,
    map_source: str | None = None,
    hospital: str | None = None,
) -> tuple[MCTFormerV2, dict[str, Any]]:
    """Rebuild the trained MCT model from its file, in eval mode.

    ``classes``, when given, must be the class vocabulary the model was trained on: a model
    applied to another vocabulary would silently mislabel every cell. ``map_source``, when
    given, is the ``localization.source`` the caller will ask of it: a model trained without
    the foreground head (``experiment=paper``, or files from before the head was the default)
    has no foreground maps, and the job must say so before it starts, not mid-way.
    ``hospital`` is the site whose images the model will see: it gets that site's input
    standardisation (``model.per_hospital``, recorded in the file). Every
    problem with the file (missing, empty, truncated, foreign, another kind of model file,
    weights that do not fit the preset it names) is a one-line :class:`CheckpointError`
    naming the file.
    """
    payload = read_model_file(path)
    where = f"checkpoint={Path(path)}"
    trained_on = list(payload["classes"])
    if classes is not None and trained_on != list(classes):
        raise CheckpointError(
            f"{where} was trained on classes {trained_on} but the data config has "
            f"{list(classes)}; pick the data config the model was trained with"
        )
    name = payload["model"]["name"]
    check_token_count(payload, where)
    try:
        model = create_mct_model(
            payload["model"], len(trained_on), hospital=hospital, load_pretrained=False
        )
    except Exception as error:  # timm and the constructors raise several types
        raise CheckpointError(
            f"{where}: its model preset {name!r} cannot be built: {first_line(error)}"
        ) from None
    load_weights(model, payload["state_dict"], where, name)
    if map_source in FOREGROUND_SOURCES and model.fg_head is None:
        raise CheckpointError(
            f"{where} has no foreground head (trained with model.foreground_head=false), so it "
            f"has no localization.source={map_source} maps; use localization=fused for its "
            "fused MCT maps (and, in w3s-postprocess, personalize.epochs=0: the site's "
            "fine-tune trains the head)"
        )
    return model.eval(), payload


def check_token_count(payload: Mapping[str, Any], where: str) -> None:
    """Refuse settings that do not fit the file's own weights, before the model is built.

    The model is built from the file's ``img_size`` and class list, then its weights are
    compared; a file naming a huge image (position embeddings grow with its square) or class
    list would take that memory first. The weights hold the token count those settings imply:
    the class tokens plus (img_size / patch)^2 patches.
    """
    state = payload["state_dict"]
    pos = state.get("pos_embed") if isinstance(state, Mapping) else None
    proj = state.get("patch_embed.proj.weight") if isinstance(state, Mapping) else None
    if not (isinstance(pos, torch.Tensor) and pos.ndim == 3):
        raise CheckpointError(f"{where}: its weights hold no position embedding of an MCT model")
    if not (isinstance(proj, torch.Tensor) and proj.ndim == 4 and proj.shape[-1] > 0):
        raise CheckpointError(f"{where}: its weights hold no patch embedding of an MCT model")
    size = payload["model"].get("img_size")
    patch = int(proj.shape[-1])
    if isinstance(size, bool) or not isinstance(size, int) or size < patch:
        raise CheckpointError(f"{where}: its model settings hold no image size ({size!r:.40})")
    tokens = len(payload["classes"]) + (size // patch) ** 2
    if pos.shape[1] != tokens:
        raise CheckpointError(
            f"{where}: the weights do not fit its settings: img_size={size} and "
            f"{len(payload['classes'])} classes make {tokens} tokens, the weights hold "
            f"{pos.shape[1]}"
        )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def round_files(directory: Path, prefix: str = "round_") -> list[tuple[int, Path]]:
    """The ``<prefix><round>.pt`` files in ``directory`` with their rounds, oldest first.

    Ordered by the number, not the name, so ``round_1000.pt`` comes after ``round_999.pt``; a
    name whose rest is not a number (``round_best.pt``) is not a round's file and is left out.
    """
    found = []
    for path in directory.glob(f"{prefix}*.pt"):
        number = path.name.removeprefix(prefix).removesuffix(".pt")
        if number.isascii() and number.isdigit():
            found.append((int(number), path))
    return sorted(found)


def prune_rounds(directory: Path, prefix: str, current: int, kept: int) -> None:
    """Keep the ``kept`` newest round files up to round ``current``; remove every later one.

    Within a run the rounds only grow and a resume starts from the newest file, so a later
    round's file is an earlier run's in the same folder: left there, it would outlive this
    run's files and be what the next resume starts from. The temporary file of a write that
    was killed (``.round_003.pt.*.tmp``, a model's size each) goes too: the round's own write
    has finished when this runs, and no other process writes this phase's files.
    """
    files = round_files(directory, prefix)
    later = [path for number, path in files if number > current]
    up_to_now = [path for number, path in files if number <= current]
    killed = list(directory.glob(f".{prefix}*.pt.*.tmp"))
    for path in later + up_to_now[:-kept] + killed:
        path.unlink(missing_ok=True)


def latest_checkpoint(
    directory: Path, prefix: str = "round_"
) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``<prefix><round>.pt`` in ``directory`` that loads, skipping unreadable ones.

    ``round_`` names the MCT rounds' checkpoints, ``pretrain_round_`` the pretraining phase's.
    A file cut short by a crash or a full disk (atomic writes make this rare, copies and
    restores do not) is logged and passed over for the one before it.
    """
    for _, path in reversed(round_files(directory, prefix)):
        try:
            return path, load_checkpoint(path)
        except Exception as error:  # torch raises several types for a damaged file
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
    return None
