"""Seed spread of the segmenter on fixed pseudo-masks: a better setting, or a lucky seed.

One ``w3s-postprocess`` (or ``w3s-ablate`` variant) output folder holds a hospital's training
pseudo-masks. This script retrains the segmenter on them with several seeds under Hydra-style
``segmenter.*`` overrides and prints the validation and test binary mIoU of every seed, their
mean and SD, and the score of the seeds' averaged softmax (an ensemble), with the class-aware
mIoU beside it and each seed's training time; each as a per-pixel argmax and with one cell
class per image, from the same models. On Dataset 2 (31
training images) one seed moved the test score by up to 12 points, so a one-seed ablation row
cannot tell settings apart (docs/localization.md).

Run from the repository root::

    .venv/bin/python -m benchmarks.segmenter_seeds <folder> --set min_steps=600 input_size=192
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf

from common.data import hospital_split
from common.metrics import class_aware_truths, score_label_maps
from common.segmenter import Decoding, create_segmenter, native_logits, train_segmenter
from post_training.artifacts import read_label_png, sample_stems

EVALUATED = ("val", "test")
METRICS = ("binary", "class_aware")
# Label maps read per pixel, and with one cell class per image (segmenter.one_cell_per_image).
DECODERS = ("per_pixel", "one_cell")


def miou(probabilities: Sequence[torch.Tensor], truth: Sequence[np.ndarray]) -> dict[str, float]:
    """Binary and class-aware mIoU (%) of the argmax label maps."""
    labels = [p.argmax(0).to(torch.uint8).numpy() for p in probabilities]
    scores = score_label_maps(labels, truth, len(probabilities[0]), "skip")
    return {"binary": 100 * scores.binary_miou, "class_aware": 100 * scores.class_aware_miou}


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Every seed's value, their mean and (population) SD, rounded for reading."""
    return {
        "seeds": [round(v, 1) for v in values],
        "mean": round(float(np.mean(values)), 1),
        "sd": round(float(np.std(values)), 1),
    }


def seed_spread(
    folder: Path, seeds: Sequence[int], overrides: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per evaluated split, decoder and metric: every seed's mIoU, mean, SD, the ensemble."""
    cfg = OmegaConf.load(folder / "config.yaml")
    seg_cfg = {**OmegaConf.to_container(cfg.segmenter, resolve=True), **overrides}
    train = hospital_split(cfg.data, cfg.hospital, "train")
    masks = [
        read_label_png(folder / "pseudo_masks" / "train" / f"{stem}.png")
        for stem in sample_stems(train.sample_ids)
    ]
    evaluated = {split: hospital_split(cfg.data, cfg.hospital, split) for split in EVALUATED}
    truths = {split: class_aware_truths(d.masks, d.labels) for split, d in evaluated.items()}
    outputs = len(cfg.data.classes) + 1
    side = int(seg_cfg["input_size"])
    scores = {split: {d: {m: [] for m in METRICS} for d in DECODERS} for split in EVALUATED}
    summed: dict[tuple[str, str], list[torch.Tensor]] = {}
    seconds = []
    for seed in seeds:
        model = create_segmenter(seg_cfg, outputs, seed=seed)
        started = time.perf_counter()
        train_segmenter(model, train.images, masks, seg_cfg, device=torch.device("cpu"), seed=seed)
        seconds.append(time.perf_counter() - started)
        for split, data in evaluated.items():
            for decoder in DECODERS:
                logits = native_logits(
                    model,
                    data.images,
                    side,
                    device=torch.device("cpu"),
                    decoding=replace(Decoding.of(seg_cfg), one_cell=decoder == "one_cell"),
                )
                probabilities = [logit.softmax(0) for logit in logits]
                for metric, value in miou(probabilities, truths[split]).items():
                    scores[split][decoder][metric].append(value)
                previous = summed.get((split, decoder))
                summed[split, decoder] = (
                    probabilities
                    if previous is None
                    else [a + b for a, b in zip(previous, probabilities, strict=True)]
                )
    result: dict[str, Any] = {"train_seconds": summary(seconds)}
    for split in EVALUATED:
        result[split] = {}
        for decoder in DECODERS:
            ensemble = miou(summed[split, decoder], truths[split])
            result[split][decoder] = {
                metric: {
                    **summary(scores[split][decoder][metric]),
                    "ensemble": round(ensemble[metric], 1),
                }
                for metric in METRICS
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a w3s-postprocess output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="segmenter.* overrides"
    )
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    result = seed_spread(args.folder, args.seeds, overrides)
    print(json.dumps({"folder": str(args.folder), "overrides": overrides, **result}))


if __name__ == "__main__":
    main()
