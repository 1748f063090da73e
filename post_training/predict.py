"""``w3s-predict``: segment new images with a segmenter trained by ``w3s-postprocess``.

Every visible file directly in ``input`` is tried; one that cannot be decoded is named in the
log and skipped, the others are segmented (any size) into ``output/<stem>.png`` label maps
(0 background, k = class k) and ``output/overlays/<stem>.png``. The exit status is 1 when a
file was skipped, 2 when nothing could run (missing segmenter or folder).

The key ``segmenter`` names a file here, while ``w3s-postprocess`` uses a config group of that
name, so this command's config lives in Hydra's config store instead of ``conf/``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from common.cli import Command
from common.errors import JobError
from common.segmenter import load_segmenter, predict
from common.training import resolve_device
from post_training.artifacts import read_image, save_label_png, save_overlay

log = logging.getLogger(__name__)
USAGE = "w3s-predict segmenter=<out>/segmenter.pt input=<folder> output=<folder>"

ConfigStore.instance().store(
    name="w3s_predict",
    node={
        "segmenter": "???",
        "input": "???",
        "output": "???",
        "device": "auto",
        "batch_size": 16,
        "overlays": True,
    },
)


def list_inputs(folder: Path) -> list[Path]:
    """Visible regular files directly in ``folder``, sorted; a clear error if it is missing."""
    if not folder.is_dir():
        raise JobError(f"input={folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise JobError(f"input={folder}: no files to segment")
    return files


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output stems: the file stem, or stem + extension where two inputs share a stem."""
    stems = [p.stem for p in paths]
    return [
        f"{p.stem}_{p.suffix.lstrip('.')}" if stems.count(p.stem) > 1 else p.stem for p in paths
    ]


def read_inputs(paths: Sequence[Path]) -> tuple[list[np.ndarray], list[int], list[Path]]:
    """Decode every file; return the images, their positions and the files that failed."""
    images, kept, failed = [], [], []
    for index, path in enumerate(paths):
        try:
            images.append(read_image(path))
        # PIL reports corrupt data with many exception types; any makes the file unusable.
        except Exception as error:
            log.error(
                "skipping %s: cannot decode it as an image (%s: %s)",
                path,
                type(error).__name__,
                error,
            )
            failed.append(path)
            continue
        kept.append(index)
    return images, kept, failed


def run_predict(cfg: DictConfig) -> int:
    """Segment the input folder; return the exit status (0 all done, 1 some files skipped)."""
    missing = [key for key in ("segmenter", "input", "output") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise JobError(f"{', '.join(f'{key}=...' for key in missing)} required: " + USAGE)
    checkpoint = Path(str(cfg.segmenter)).expanduser().resolve()
    try:
        model, seg_cfg, classes = load_segmenter(checkpoint)
    except FileNotFoundError as error:
        raise JobError(f"segmenter={checkpoint}: file not found") from error
    except ValueError as error:
        raise JobError(str(error)) from error
    paths = list_inputs(Path(str(cfg.input)).expanduser().resolve())
    out = Path(str(cfg.output)).expanduser().resolve()
    names = output_names(paths)
    images, kept, failed = read_inputs(paths)
    log.info("segmenting %d images with %s (classes %s)", len(images), seg_cfg["arch"], classes)
    labels = predict(
        model,
        images,
        int(seg_cfg["input_size"]),
        device=resolve_device(str(cfg.device)),
        batch_size=int(cfg.batch_size),
    )
    for index, image, label_map in zip(kept, images, labels, strict=True):
        save_label_png(out / f"{names[index]}.png", label_map)
        if cfg.overlays:
            save_overlay(out / "overlays" / f"{names[index]}.png", image, label_map)
    log.info("wrote %d masks to %s", len(images), out)
    if failed:
        log.error("%d file(s) skipped: %s", len(failed), ", ".join(p.name for p in failed))
        return 1
    return 0


COMMAND = Command(
    name="w3s-predict",
    summary=__doc__,
    config="w3s_predict",
    job=lambda cfg, _: run_predict(cfg),
    keys={
        "segmenter": "segmenter.pt written by w3s-postprocess (required)",
        "input": "folder of images to segment (required)",
        "output": "folder for the label maps and overlays (required)",
        "device": "auto (CUDA when present), cpu or cuda",
        "batch_size": "images per forward pass",
        "overlays": "also write colour overlays (true/false)",
    },
    examples=["w3s-predict segmenter=<out>/segmenter.pt input=new_images output=masks"],
    own_store=True,
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-predict``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
