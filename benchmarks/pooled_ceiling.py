"""Measure whether the other hospitals' true masks help a segmenter name one hospital's cell types.

A segmenter shared between the sites (trained as its own federated phase) could at best learn
what one segmenter trained on every site's true training masks, pooled in one place, learns.
This trains that pooled segmenter and, beside it on the same fold and seed, the same segmenter
on the target hospital's true masks alone. Each is scored on every hospital's validation and
test split: the cells whose type it names rightly (``cell_type_accuracy``) and the binary
mIoU. Where pooling does not beat the hospital alone even with expert masks, a shared
segmenter phase of the weakly supervised pipeline has nothing to gain on the cell types either.

Run from the repository root::

    .venv/bin/python -m benchmarks.pooled_ceiling --target dataset2 --folds 0 1 2 3 4 \
        --seeds 0 1 2 -- data=wbc_zxaoyou data.root=<root> data.split.folds=5

One JSON line per fold, seed and training set; then one per training set, hospital, split and
seed with the cells summed over the folds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from common.config import compose_config
from common.data import hospital_names
from common.metrics import cells_named_rightly
from experiments.supervised import predict_and_score, train_on_true_masks

SPLITS = ("val", "test")
TRAINED_ON = ("local", "pooled")


def pooled_and_local_rows(
    overrides: Sequence[str], target: str, fold: int, seed: int
) -> list[dict[str, Any]]:
    """One row per training set: each hospital's cells named rightly per split, binary mIoU."""
    cfg = compose_config(
        [*overrides, f"data.split.fold={fold}", f"seed={seed}"], config_name="postprocess"
    )
    everyone = hospital_names(cfg.data)
    if target not in everyone:
        raise ValueError(f"--target {target!r} is not one of the hospitals {everyone}")
    rows = []
    for trained_on, hospitals in zip(TRAINED_ON, ([target], everyone), strict=True):
        started = time.perf_counter()
        model, loss = train_on_true_masks(cfg, hospitals)
        row: dict[str, Any] = {
            "fold": fold,
            "seed": seed,
            "trained_on": trained_on,
            "hospitals": hospitals,
            "train_loss": round(loss, 4),
            "train_s": round(time.perf_counter() - started, 1),
            "scores": {},
        }
        for hospital in everyone:
            for split in SPLITS:
                _, _, scores = predict_and_score(model, cfg, hospital, split)
                confusion = np.asarray(scores.cell_types)
                row["scores"][f"{hospital}_{split}"] = {
                    "right": cells_named_rightly(confusion),
                    "cells": int(confusion.sum()),
                    "binary_miou": round(100 * scores.binary_miou, 2),
                }
        rows.append(row)
    return rows


def summed_over_folds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells named rightly per training set, hospital, split and seed, summed over the folds."""
    sums: dict[tuple[str, str, int], list[int]] = {}
    for row in rows:
        for scored_at, cells in row["scores"].items():
            tally = sums.setdefault((row["trained_on"], scored_at, row["seed"]), [0, 0])
            tally[0] += cells["right"]
            tally[1] += cells["cells"]
    return [
        {
            "trained_on": trained_on,
            "scored_at": scored_at,
            "seed": seed,
            "right": right,
            "cells": cells,
            "accuracy": round(right / cells, 3) if cells else None,
        }
        for (trained_on, scored_at, seed), (right, cells) in sums.items()
    ]


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the hospital whose segmenter trains alone")
    parser.add_argument("--folds", type=int, nargs="+", default=[0], help="data.split.fold values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/postprocess.yaml")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    rows = []
    for fold in args.folds:
        for seed in args.seeds:
            for row in pooled_and_local_rows(args.overrides, args.target, fold, seed):
                print(json.dumps(row), flush=True)
                rows.append(row)
    for line in summed_over_folds(rows):
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
