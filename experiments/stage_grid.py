"""``w3s-stages``: one picture that shows at which stage localization fails.

One row per image of a split; columns: image, ground truth, class attention, patch-CAM, fused,
refined, pseudo-mask, segmenter output. The four map columns are generated here from the
checkpoint (the image's own class), or from the hospital's fine-tuned copy where
``w3s-postprocess`` kept one; the last two are read from the ``w3s-postprocess`` outputs of the
same checkpoint and hospital (run it first; missing outputs are shown blank and logged).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.checkpoint import load_model
from common.cli import Command
from common.config import number_setting
from common.data import hospital_split
from common.data.splits import SPLITS
from common.errors import JobError
from common.localization import MapSettings, generate_maps
from common.metrics import class_aware_truth
from common.training import resolve_device
from post_training.artifacts import heatmap, overlay, read_label_png, sample_stems, save_grid
from post_training.personalize import PERSONALIZED_MODEL
from post_training.postprocess import (
    SITE_KEYS,
    check_hospital,
    check_postprocess_config,
    resolve_output_dir,
    stage_grid_name,
)

log = logging.getLogger(__name__)

# Map columns: title -> how MapSettings differs from the configured one.
MAP_COLUMNS: dict[str, dict[str, object]] = {
    "class attention": {"source": "class_attention", "refine": False},
    "patch-CAM": {"source": "patch_cam", "refine": False},
    "fused": {"source": "fused", "refine": False},
    "refined": {"source": "fused", "refine": True},
}
# (column title, folder of the w3s-postprocess outputs)
LABEL_COLUMNS = (("pseudo-mask", "pseudo_masks"), ("segmenter", "predictions"))


def _label_column(folder: Path, stems: list[str], image: list[np.ndarray]) -> list[np.ndarray]:
    """Overlays of saved label maps; a blank tile (and one warning) where they are missing."""
    tiles = []
    missing = 0
    for stem, picture in zip(stems, image, strict=True):
        path = folder / f"{stem}.png"
        if path.is_file():
            tiles.append(overlay(picture, read_label_png(path)))
        else:
            missing += 1
            tiles.append(np.full_like(picture, 255))
    if missing:
        log.warning(
            "%d of %d label maps missing in %s (run w3s-postprocess)", missing, len(stems), folder
        )
    return tiles


def write_stage_grid(cfg: DictConfig) -> Path:
    """Write the grid PNG and return its path."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise JobError("checkpoint=... is required: the final_model.pt of a training run")
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    hospital = check_hospital(cfg)
    split = str(cfg.grid.split)
    out = resolve_output_dir(cfg, checkpoint)
    model_file = maps_model(out, checkpoint)
    model, _ = load_model(model_file, list(cfg.data.classes), cfg.localization.source, hospital)
    data = hospital_split(cfg.data, hospital, split)
    count = min(int(cfg.grid.num_images), len(data))
    images, labels = list(data.images[:count]), np.asarray(data.labels[:count])
    stems = sample_stems(data.sample_ids)[:count]
    settings = MapSettings.from_config(OmegaConf.to_container(cfg.localization))
    device = resolve_device(str(cfg.device))
    columns: dict[str, list[np.ndarray]] = {"image": images}
    if data.masks is not None:
        columns["ground truth"] = [
            overlay(image, class_aware_truth(mask, int(label)))
            for image, mask, label in zip(images, data.masks[:count], labels, strict=True)
        ]
    for title, change in MAP_COLUMNS.items():
        maps, _, _ = generate_maps(
            model, images, labels, replace(settings, **change), device=device
        )
        columns[title] = [
            heatmap(image, image_maps.amax(0).numpy())
            for image, image_maps in zip(images, maps, strict=True)
        ]
    for title, folder in LABEL_COLUMNS:
        columns[title] = _label_column(out / folder / split, stems, images)
    rows = [[column[i] for column in columns.values()] for i in range(count)]
    path = Path(str(cfg.grid.output)) if cfg.grid.output else out / stage_grid_name(split)
    save_grid(path, rows, list(columns))
    log.info("stage grid of %d %s images: %s", count, split, path)
    return path


def maps_model(out: Path, checkpoint: Path) -> Path:
    """The model whose maps ``w3s-postprocess`` used: its fine-tuned copy where it kept one.

    Only a job of this very checkpoint: a round checkpoint's output folder is its run's, which
    may hold the job (and the fine-tuned copy) of the final model, whose maps would otherwise
    be shown as this checkpoint's.
    """
    job = out / "config.yaml"
    ran_on = OmegaConf.load(job).get("checkpoint") if job.is_file() else None
    if ran_on is None or Path(str(ran_on)).expanduser().resolve() != checkpoint:
        if job.is_file():
            log.warning(
                "%s holds the w3s-postprocess job of %s, not of %s: the maps are %s's own, the "
                "label columns that job's (run w3s-postprocess checkpoint=%s for its own)",
                out,
                ran_on,
                checkpoint,
                checkpoint.name,
                checkpoint,
            )
        return checkpoint
    personal = out / PERSONALIZED_MODEL
    return personal if personal.is_file() else checkpoint


def check_stage_grid_config(cfg: DictConfig) -> None:
    """The grid's own settings, then the post-training job's (:func:`check_postprocess_config`).

    Raises
    ------
    JobError
        Naming ``grid.split`` or ``grid.num_images`` when it cannot make a grid.
    """
    if str(cfg.grid.split) not in SPLITS:
        raise JobError(f"grid.split={cfg.grid.split}: expected one of {', '.join(SPLITS)}")
    if number_setting(cfg, "grid.num_images", whole=True) < 1:
        raise JobError(f"grid.num_images={cfg.grid.num_images}: expected a whole number >= 1")
    check_postprocess_config(cfg)


def _write_stage_grid(cfg: DictConfig, _: list[str]) -> Path:
    with torch.inference_mode():
        return write_stage_grid(cfg)


COMMAND = Command(
    name="w3s-stages",
    summary=__doc__,
    config="postprocess",
    job=_write_stage_grid,
    keys={
        **SITE_KEYS,
        "grid.split": "which split's images: test (default), val or train",
        "grid.num_images": "rows of the grid",
        "grid.output": "the PNG to write (default: <output_dir>/stages_<split>.png)",
    },
    examples=[
        "w3s-stages checkpoint=<run>/final_model.pt data=wbc_zxaoyou hospital=dataset1",
    ],
    check=check_stage_grid_config,
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-stages``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
