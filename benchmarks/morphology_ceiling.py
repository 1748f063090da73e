"""Measure how far a hospital's true cells tell its cell types apart, fitted on all images but one.

The feature probe's morphology row (``benchmarks.feature_probe``) fits hand measurements of the
*true* nucleus and cell on one training split. At a small hospital that split is a few dozen
images, so a low score could be the split, the model's input size or the measurements. This
asks the question with the most the data allows: leave-one-out over all of the hospital's
images (every split of the configured split settings), at each given image size, for the
morphology measurements and, as the model-free colour reference, the colour histogram. A
score here under an accuracy target says that what a haematologist measures on the perfectly
outlined cell, fitted to all of this data, does not reach it either: a sign that the limit
lies in the images and labels rather than in a model's recipe.

Run from the repository root::

    .venv/bin/python -m benchmarks.morphology_ceiling --sizes 96 288 -- data=wbc_zxaoyou

One JSON line per hospital with masks and size; hospitals without masks are named and skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.feature_probe import linear_probe, morphology_features, pixel_features
from common.config import compose_config
from common.data import SplitTensors, hospital_names, split_tensors

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


def leave_one_out_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    standardise: bool,
    steps: int = 500,
) -> float:
    """Share of images (N, D features) that a probe fitted on all the others classifies right."""
    right = 0
    everyone = torch.arange(len(labels))
    for held_out in range(len(labels)):
        others = everyone != held_out
        probe = linear_probe(
            features[others], labels[others], num_classes, standardise=standardise, steps=steps
        )
        right += int(probe(features[held_out : held_out + 1]).argmax(1).item() == labels[held_out])
    return round(right / len(labels), 3)


def all_images(data_cfg: Any, hospital: str, size: int) -> SplitTensors | None:
    """Every split of the hospital at ``size`` px in one set; None without masks."""
    splits = [split_tensors(data_cfg, hospital, split, size) for split in SPLITS]
    if any(s.masks is None for s in splits):
        return None
    return SplitTensors(
        images=torch.cat([s.images for s in splits]),
        labels=torch.cat([s.labels for s in splits]),
        masks=torch.cat([s.masks for s in splits]),
    )


def ceiling_row(data: SplitTensors, num_classes: int) -> dict[str, int | float]:
    """Leave-one-out accuracy of the morphology and histogram probes; the majority's share."""
    morphology = morphology_features(data.images, data.masks)
    histogram = pixel_features(data.images)["histogram"]
    commonest = torch.bincount(data.labels, minlength=num_classes).max()
    return {
        "images": len(data.labels),
        "majority": round(float(commonest) / len(data.labels), 3),
        "morphology": leave_one_out_accuracy(
            morphology, data.labels, num_classes, standardise=True
        ),
        "histogram": leave_one_out_accuracy(histogram, data.labels, num_classes, standardise=False),
    }


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[96], help="image sides in pixels to measure at"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the data")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    cfg = compose_config(list(args.overrides))
    num_classes = len(cfg.data.classes)
    for hospital in hospital_names(cfg.data):
        for size in args.sizes:
            data = all_images(cfg.data, hospital, size)
            if data is None:
                log.warning("hospital %s has no masks: skipped", hospital)
                break
            row = {"hospital": hospital, "size": size, **ceiling_row(data, num_classes)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
