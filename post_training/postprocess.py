"""``w3s-postprocess``: localization maps -> pseudo-masks -> segmenter at one hospital, scored.

Every choice (background constants, disk radius, Otsu channel) is made on the hospital's
validation split; every reported number is on its test split. The baselines go through the
same evaluation code as the weakly supervised stages. Outputs stay under ``output_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.checkpoint import load_model, run_config
from common.cli import Command
from common.config import number_setting
from common.data import SplitSpec, check_split, hospital_names, load_hospital, split_digest
from common.data.splits import SPLITS
from common.errors import JobError
from common.files import staged_outputs
from common.levers import head_levers
from common.localization import FOREGROUND_SOURCES, MapSettings
from common.model import MCTFormerV2
from common.progress import Profile
from common.pseudo import create_masker
from common.segmenter import check_segmenter_settings
from common.training import check_device, resolve_device
from post_training.personalize import (
    PERSONALIZED_MODEL,
    SiteMaps,
    personal_train_config,
    personalize_stage,
)
from post_training.report import markdown_table, save_figure, write_report
from post_training.stages import (
    Evaluation,
    check_evaluation_settings,
    disk_stage,
    make_maps,
    option_grid,
    otsu_stage,
    pseudo_stage,
    save_split_maps,
    seeds_stage,
    segmenter_stage,
)

log = logging.getLogger(__name__)


def stage_grid_name(split: str) -> str:
    """The picture ``w3s-stages`` draws of a split's outputs into the job's folder."""
    return f"stages_{split}.png"


# w3s-stages' pictures of a job's folder, drawn after a job or before any ran there: a rerun
# removes them (they show the last outputs), and they never make the folder someone else's.
STAGE_GRIDS = tuple(map(stage_grid_name, SPLITS))
# Everything the job writes under its output folder; a rerun replaces all of them.
OUTPUTS = (
    "config.yaml",
    PERSONALIZED_MODEL,
    "maps",
    "pseudo_masks",
    "predictions",
    "segmenter.pt",
    "figure.png",
    "metrics.json",
    "metrics.md",
    *STAGE_GRIDS,
)


def resolve_output_dir(cfg: DictConfig, checkpoint: Path) -> Path:
    """``output_dir`` made absolute, else ``<run dir>/postprocess/<hospital>``.

    The run dir holds ``final_model.pt`` and ``checkpoints/round_NNN.pt``, so a round checkpoint
    maps to the same place as the final model.
    """
    if cfg.output_dir:
        return Path(str(cfg.output_dir)).expanduser().resolve()
    run_dir = checkpoint.parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    return run_dir / "postprocess" / str(cfg.hospital)


def check_output_folder(out: Path, checkpoint: Path) -> None:
    """Refuse a folder whose entries of the job's names no ``w3s-postprocess`` run wrote.

    A rerun replaces the job's outputs by name (``OUTPUTS``). In a folder of the user's own
    (``output_dir=~/project``) a ``config.yaml`` or ``maps/`` of theirs would be gone for
    good; the job's own ``config.yaml`` names the checkpoint and the hospital it ran with.
    The model the run reads is refused among them too: a run from an earlier run's
    ``personalized_model.pt`` into the same folder would replace it, and keep no model in
    its place where the global model wins.
    """
    for name in OUTPUTS:
        if checkpoint.is_relative_to(out / name):
            raise JobError(
                f"checkpoint={checkpoint} is this run's output {name} in output_dir={out}, "
                "which the run replaces; copy it out of the folder or choose another output_dir"
            )
    taken = [
        name
        for name in OUTPUTS
        if name not in STAGE_GRIDS and ((out / name).exists() or (out / name).is_symlink())
    ]
    if not taken:
        return
    try:
        job = OmegaConf.load(out / "config.yaml")
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException):  # not UTF-8 text too
        job = None
    if not (isinstance(job, DictConfig) and "checkpoint" in job and "hospital" in job):
        raise JobError(
            f"output_dir={out} holds {', '.join(taken)}, which no w3s-postprocess run wrote and "
            "a run would replace; choose a new or empty output_dir"
        )


def check_hospital(cfg: DictConfig) -> str:
    """The configured hospital name, or a clear error listing the ones that exist."""
    names = hospital_names(cfg.data)
    if OmegaConf.is_missing(cfg, "hospital"):
        raise JobError(f"hospital=... is required; data={cfg.data.name} has: {', '.join(names)}")
    name = str(cfg.hospital)
    if name not in names:
        raise JobError(
            f"hospital={name} is not in data.hospitals of data={cfg.data.name}; "
            f"choose one of: {', '.join(names)}"
        )
    return name


def run_postprocess(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage for ``cfg.hospital`` and write the outputs; return the metrics.

    Raises
    ------
    JobError
        For a missing checkpoint, an unknown hospital or a class mismatch.
    """
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise JobError("checkpoint=... is required: the final_model.pt of a training run")
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    hospital = check_hospital(cfg)
    model, payload = load_model(
        checkpoint, list(cfg.data.classes), cfg.localization.source, hospital
    )
    check_same_split(payload, cfg.data, checkpoint, hospital)
    check_split_sizes(cfg.data, hospital)
    check_layers(cfg, model)
    if int(cfg.personalize.epochs) > 0:
        personal_train_config(payload, cfg, hospital)  # refused now, not after the maps
    out = resolve_output_dir(cfg, checkpoint)
    check_output_folder(out, checkpoint)
    log.info("hospital %s, model round %s, outputs in %s", hospital, payload.get("round"), out)
    # An earlier run's files (its fine-tuned copy, masks of images no longer in the split)
    # would no longer be this run's; they stay until this run has written all of its own.
    with staged_outputs(out, OUTPUTS) as staging:
        metrics = post_train(model, payload, cfg, hospital, staging)
    log.info("outputs in %s", out)
    return metrics


def post_train(
    model: torch.nn.Module, payload: dict[str, Any], cfg: DictConfig, hospital: str, out: Path
) -> dict[str, Any]:
    """Every stage at ``hospital``, its outputs written under ``out``; return the metrics."""
    # The checkpoint as an absolute path: w3s-stages tells by it whose job the folder holds.
    recorded = OmegaConf.merge(
        cfg, {"checkpoint": str(Path(str(cfg.checkpoint)).expanduser().resolve())}
    )
    (out / "config.yaml").write_text(OmegaConf.to_yaml(recorded), encoding="utf-8")
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    classes = list(payload["classes"])

    profile = Profile()
    with profile.phase("data and maps"):
        splits = make_maps(model, cfg, hospital, device)
    evaluation = Evaluation(splits, len(classes) + 1, cfg.evaluation)
    with profile.phase("seeds"):
        maps = SiteMaps(splits, *seeds_stage(splits, evaluation, int(cfg.batch_size)))
    personalized = None
    if int(cfg.personalize.epochs) > 0:
        with profile.phase("personalize"):
            maps, personalized = personalize_stage(
                model, payload, cfg, hospital, maps, evaluation, out, device
            )
    splits, seeds, seed_labels = maps.splits, maps.seeds, maps.labels
    # The maps row's time includes making maps, whichever model's row was kept.
    seeds.seconds += profile.seconds["data and maps"]
    save_split_maps(splits, out)
    with profile.phase("pseudo-masks"):
        pseudo, pseudo_labels = pseudo_stage(cfg, splits, evaluation, out, device)
    segmenter, predicted = segmenter_stage(
        cfg, splits, pseudo_labels["train"], evaluation, out, device, classes
    )
    profile.seconds.update(segmenter.parts)
    stages = [seeds, pseudo, segmenter]
    with profile.phase("baselines"):
        if evaluation.has_truth:
            stages += [disk_stage(splits, evaluation), otsu_stage(splits, evaluation)]
        else:
            log.warning(
                "hospital %s has no ground-truth masks: outputs written, nothing scored", hospital
            )
    with profile.phase("figure"):
        save_figure(
            out / "figure.png",
            splits["test"],
            seed_labels["test"],
            pseudo_labels["test"],
            predicted["test"],
        )
    log.info("seconds per phase: %s", profile)
    summary = {
        "hospital": hospital,
        "round": payload.get("round"),
        "classes": classes,
        "images": {name: len(split.data) for name, split in splits.items()},
        "absent": evaluation.absent,
        "select_by": evaluation.select_by,
        "scored": evaluation.has_truth,
        "personalize": personalized,
        "seconds": profile.seconds,
    }
    metrics = write_report(out, summary, stages)
    log.info(
        "metrics of %s (test split):\n%s", hospital, markdown_table(stages, evaluation.has_truth)
    )
    return metrics


def check_postprocess_config(cfg: DictConfig) -> None:
    """Refuse what would fail mid-run: a missing checkpoint or hospital, a bad method option."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise JobError("checkpoint=... is required: the final_model.pt of a training run")
    check_postprocess_settings(cfg)
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    if not checkpoint.is_file():
        raise JobError(f"checkpoint={checkpoint}: file not found")


def check_postprocess_settings(cfg: DictConfig) -> None:
    """Every check of :func:`check_postprocess_config` but the checkpoint's.

    A harness that trains the checkpoint first checks the job's settings before the training.
    """
    check_hospital(cfg)
    check_split(cfg.data)
    check_device(cfg)
    number_setting(cfg, "seed", whole=True)
    if number_setting(cfg, "batch_size", whole=True) < 1:
        raise JobError(f"batch_size={cfg.batch_size}: expected a whole number >= 1")
    rounds = number_setting(cfg, "self_training.rounds", whole=True)
    confidence = number_setting(cfg, "self_training.confidence")
    if rounds < 0 or not 0.0 <= confidence < 1.0:
        raise JobError(
            f"self_training.rounds={rounds:g}, self_training.confidence={confidence:g}: rounds "
            "must be >= 0 and confidence in [0, 1)"
        )
    epochs = number_setting(cfg, "personalize.epochs", whole=True)
    min_steps = number_setting(cfg, "personalize.min_steps", whole=True)
    lr_scale = number_setting(cfg, "personalize.lr_scale")
    copies = number_setting(cfg, "personalize.copies", whole=True)
    if min(epochs, min_steps) < 0 or not lr_scale > 0.0 or copies < 1:
        raise JobError(
            f"personalize.epochs={epochs:g}, personalize.min_steps={min_steps:g}, "
            f"personalize.lr_scale={lr_scale:g}, personalize.copies={copies:g}: epochs and "
            "min_steps must be >= 0 (epochs 0: the global model as it is), lr_scale > 0 and "
            "copies >= 1"
        )
    try:
        check_segmenter_settings(OmegaConf.to_container(cfg.segmenter, resolve=True))
        check_evaluation_settings(OmegaConf.to_container(cfg.evaluation, resolve=True))
    except ValueError as error:
        raise JobError(str(error)) from None
    pseudo = OmegaConf.to_container(cfg.pseudo, resolve=True)
    try:
        MapSettings.from_config(OmegaConf.to_container(cfg.localization))
    except (ValueError, TypeError) as error:
        raise JobError(str(error)) from None
    try:
        options, grid = option_grid(pseudo)
        for values in [{}, *grid]:  # its own values too: a site without masks uses them
            create_masker({**options, **values})
    except (ValueError, TypeError) as error:
        raise JobError(f"pseudo={pseudo.get('method', '?')}: {error}") from None


def check_split_sizes(data_cfg: DictConfig, hospital: str) -> None:
    """Refuse a hospital whose splits the job cannot use, before any stage runs.

    The segmenter trains on at least two images, and the choices and the scores need a
    validation and a test image: with fewer, the job ran every costly stage, then failed on
    the segmenter or the test figure in a traceback.
    """
    labels = load_hospital(data_cfg, hospital).labels
    sizes = [len(SplitSpec.of(data_cfg).indices(labels)[split]) for split in SPLITS]
    if sizes[0] < 2 or min(sizes[1:]) < 1:
        raise JobError(
            f"hospital={hospital}: its {' / '.join(SPLITS)} splits hold "
            f"{' / '.join(map(str, sizes))} images, the job needs at least 2 / 1 / 1 (more "
            "images, or other data.split.fractions)"
        )


def check_layers(cfg: DictConfig, model: MCTFormerV2) -> None:
    """Refuse ``localization.last_k_layers`` beyond the loaded model's depth, naming both."""
    depth = len(model.blocks)
    if not 1 <= int(cfg.localization.last_k_layers) <= depth:
        raise JobError(
            f"localization.last_k_layers={cfg.localization.last_k_layers}: the model has "
            f"{depth} layers"
        )


def foreground_head_settings(cfg: DictConfig) -> list[str]:
    """The post-training settings that need the model's foreground head, as ``key=value``.

    Maps from the head, and a site fine-tune that trains it, fail on a model trained with
    ``model.foreground_head=false`` (``experiment=paper``); a harness that trains the model
    first can refuse them before the hours of training instead of after.
    """
    needs = []
    if str(cfg.localization.source) in FOREGROUND_SOURCES:
        needs.append(f"localization.source={cfg.localization.source}")
    if int(cfg.personalize.epochs) > 0:
        levers = head_levers(cfg.personalize.train.get("levers") or {})
        needs += [f"personalize.train.levers.{key}={value}" for key, value in levers.items()]
    return needs


def split_overrides(spec: SplitSpec, keys: Sequence[str]) -> str:
    """``spec``'s ``keys`` as the overrides that set them (``data.split.folds=5``)."""

    def written(value: object) -> str:
        if value is None:
            return "null"
        if isinstance(value, tuple):
            return "[" + ",".join(map(written, value)) + "]"
        return f"{value:g}" if isinstance(value, float) else str(value)

    return " ".join(f"data.split.{key}={written(getattr(spec, key))}" for key in keys)


def check_same_split(payload: dict, data_cfg: DictConfig, checkpoint: Path, hospital: str) -> None:
    """Refuse a split other than the training run's: its test images could be training images.

    The split settings must be the run's, and the hospital's images must still fall into the
    splits they trained in: the model file keeps the fingerprint each hospital sent with its
    training replies (``common.data.split_digest``), and an image added, removed or renamed
    since then redraws the splits. Model files without a config or a fingerprint for this
    hospital (files of earlier versions, a hospital outside the federation) are taken as
    they are.
    """
    if (run := run_config(payload, checkpoint)) is None:
        return
    trained = SplitSpec.of(run.data)
    used = check_split(data_cfg)
    if trained != used:
        keys = [
            f.name for f in fields(SplitSpec) if getattr(trained, f.name) != getattr(used, f.name)
        ]
        raise JobError(
            f"checkpoint={checkpoint} was trained with {split_overrides(trained, keys)}, this "
            f"job has {split_overrides(used, keys)}: its test images could be training images; "
            "pass the training run's values"
        )
    recorded = list((payload.get("splits") or {}).get(hospital) or [])
    if not recorded:
        return
    if len(recorded) > 1:
        raise JobError(
            f"checkpoint={checkpoint}: hospital {hospital}'s images changed while the model "
            f"trained (its split had {len(recorded)} different fingerprints over the rounds), "
            "so images it trained on may be among its test images; train again on a fixed "
            "image set (w3s-predict makes masks for any images without scoring them)"
        )
    if split_digest(data_cfg, hospital) != recorded[0]:
        raise JobError(
            f"checkpoint={checkpoint}: hospital {hospital}'s images are not the ones the model "
            "trained on (an image was added, removed or renamed since), which redraws its "
            "splits and could put training images in its test split; restore the image set "
            "of the training run, or train again (w3s-predict makes masks for any images "
            "without scoring them)"
        )


# The keys every command that applies a trained model at one hospital shares, for --help.
SITE_KEYS = {
    "checkpoint": "the trained model: <run dir>/final_model.pt (required)",
    "data": "the data config the model was trained with (default: synthetic)",
    "hospital": "this site's key of data.hospitals (required)",
}

COMMAND = Command(
    name="w3s-postprocess",
    summary=__doc__,
    config="postprocess",
    job=lambda cfg, _: run_postprocess(cfg),
    keys={
        **SITE_KEYS,
        "pseudo": "pseudo-mask method: stain_grow (default), attn_rw, threshold, psa, psa_cpu",
        "segmenter": "segmenter preset: cpu (default, LR-ASPP), mobilenet, lraspp, resnet50",
        "output_dir": "where outputs go (default: <run dir>/postprocess/<hospital>)",
    },
    examples=[
        "w3s-postprocess checkpoint=<run>/final_model.pt hospital=hospital_a",
        "w3s-postprocess checkpoint=<run>/final_model.pt data=wbc_zxaoyou hospital=dataset1",
    ],
    check=check_postprocess_config,
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-postprocess``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
