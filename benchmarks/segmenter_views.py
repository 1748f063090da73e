"""Score a trained segmenter with and without test-time augmentation, from the same weights.

A ``w3s-postprocess`` output folder holds the hospital's ``segmenter.pt`` and the job's
``config.yaml``. This predicts the validation and test splits twice with those weights, from
the image as given and from the mean of its 8 flipped and turned views
(``segmenter.test_time_augmentation``), and prints one JSON line per folder with the binary and
class-aware mIoU (%) of each. The pair differs only in the decoding, so a difference is the
augmentation's, not a new training draw's.

Run from the repository root::

    .venv/bin/python -m benchmarks.segmenter_views <folder> [<folder> ...]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from common.data import hospital_split
from common.metrics import class_aware_truths, score_label_maps
from common.segmenter import Decoding, load_segmenter, predict

EVALUATED = ("val", "test")
DECODINGS = {"plain": False, "turned": True}


def score_views(folder: Path) -> dict[str, Any]:
    """Binary and class-aware mIoU (%) per split of the folder's segmenter, per decoding."""
    cfg = OmegaConf.load(folder / "config.yaml")
    model, seg_cfg, classes = load_segmenter(folder / "segmenter.pt")
    row: dict[str, Any] = {"folder": str(folder), "hospital": cfg.hospital}
    for split in EVALUATED:
        data = hospital_split(cfg.data, cfg.hospital, split)
        if data.masks is None:
            raise SystemExit(f"{folder}: hospital {cfg.hospital} has no masks to score against")
        truth = class_aware_truths(data.masks, data.labels)
        for decoding, turned in DECODINGS.items():
            labels = predict(
                model,
                data.images,
                int(seg_cfg["input_size"]),
                device=torch.device("cpu"),
                decoding=replace(Decoding.of(seg_cfg), turned_views=turned),
            )
            scores = score_label_maps(labels, truth, len(classes) + 1, cfg.evaluation.absent)
            row[f"{decoding}_{split}"] = round(100 * scores.binary_miou, 2)
            row[f"{decoding}_{split}_class_aware"] = round(100 * scores.class_aware_miou, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", type=Path, nargs="+", help="w3s-postprocess output folders")
    for folder in parser.parse_args().folders:
        print(json.dumps(score_views(folder)), flush=True)


if __name__ == "__main__":
    main()
