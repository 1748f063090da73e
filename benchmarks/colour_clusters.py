"""Measure whether a hospital's cell is one side of a two-colour split of its images.

The foreground contrast (``common.levers``) splits every image into two sides that look alike
across images. When colour alone already splits the cell from the background, the contrast
can find the whole cell; when it splits the nucleus from the rest, that is what the head
learns. This measures the split colour alone gives: per image, two k-means clusters of the
pixels in a colour space, the smaller taken as the cell (as ``oriented_foreground`` does), and
its mean IoU with the cell (nucleus and cytoplasm) and with the nucleus; with ``--clusters 3``
and more, all clusters but the largest are the cell. Training and validation images only;
their masks score, nothing is fitted to them.

Run from the repository root::

    .venv/bin/python -m benchmarks.colour_clusters --clusters 2 3 4 -- data=wbc_zxaoyou

One JSON line per hospital, number of clusters and colour space.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

import numpy as np

from common.config import compose_config
from common.data import BACKGROUND, NUCLEUS, hospital_names, hospital_split
from common.imaging import resize_images, resize_labels

SIDE = 96  # the tiny preset's input size: the grid the head sees, up to patching


def _standardised(values: np.ndarray) -> np.ndarray:
    return (values - values.mean(axis=(0, 1))) / (values.std(axis=(0, 1)) + 1e-6)


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(rgb, 1 / 255, 1.0))


def _chromaticity(values: np.ndarray) -> np.ndarray:
    return values / (values.sum(axis=2, keepdims=True) + 1e-3)


# Colour spaces: raw as model.standardise_input=none sees it, the rest standardised per image
# and channel as model.standardise_input=channels does.
SPACES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rgb": lambda rgb: rgb,
    "rgb_standardised": _standardised,
    "chromaticity": lambda rgb: _standardised(_chromaticity(rgb)),
    "optical_density": lambda rgb: _standardised(_optical_density(rgb)),
    "stain_chromaticity": lambda rgb: _standardised(_chromaticity(_optical_density(rgb))),
}


def cell_side(values: np.ndarray, clusters: int = 2, starts: int = 5) -> np.ndarray:
    """Boolean (H, W): all but the largest of ``clusters`` k-means clusters of (H, W, 3) values.

    With two clusters that is the smaller side, as the orientation of the head's maps takes
    it; with more, the background is taken to be one colour and the cell the rest. The best of
    ``starts`` fixed starts (the first along the principal axis, the rest random pixels of a
    seeded draw) is kept, so the split is deterministic and not a bad start's.
    """
    pixels = values.reshape(-1, values.shape[-1])
    axis = np.linalg.svd(pixels - pixels.mean(0), full_matrices=False)[2][0]
    ordered = pixels[(pixels @ axis).argsort()]
    rng = np.random.default_rng(0)
    best: tuple[float, np.ndarray] | None = None
    for start in range(starts):
        centres = (
            np.stack([chunk.mean(0) for chunk in np.array_split(ordered, clusters)])
            if start == 0
            else pixels[rng.choice(len(pixels), clusters, replace=False)]
        )
        for _ in range(20):
            distances = ((pixels[:, None] - centres[None]) ** 2).sum(axis=2)
            assigned = distances.argmin(axis=1)
            centres = np.stack(
                [
                    pixels[assigned == k].mean(0) if (assigned == k).any() else centres[k]
                    for k in range(clusters)
                ]
            )
        inertia = float(distances.min(axis=1).sum())
        if best is None or inertia < best[0]:
            best = (inertia, assigned)
    assert best is not None  # starts >= 1
    assigned = best[1]
    largest = np.bincount(assigned, minlength=clusters).argmax()
    return (assigned != largest).reshape(values.shape[:2])


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(int((a | b).sum()), 1))


def hospital_scores(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], clusters: int = 2
) -> dict[str, dict]:
    """Per colour space: mean IoU of the cell side (:func:`cell_side`) with cell and nucleus."""
    # Resized once, the way the model's input is (antialiased), masks by nearest neighbour.
    colours = resize_images(images, SIDE).permute(0, 2, 3, 1).double().numpy() / 255.0
    truths = resize_labels(masks, SIDE).numpy()
    scores: dict[str, dict] = {}
    for space, transform in SPACES.items():
        cell, nucleus = [], []
        for rgb, truth in zip(colours, truths, strict=True):
            side = cell_side(transform(rgb), clusters)
            cell.append(iou(side, truth != BACKGROUND))
            nucleus.append(iou(side, truth == NUCLEUS))
        scores[space] = {
            "cell_iou": round(float(np.mean(cell)), 3),
            "nucleus_iou": round(float(np.mean(nucleus)), 3),
        }
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clusters", type=int, nargs="+", default=[2], help="k of k-means")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=wbc_zxaoyou")
    args = parser.parse_args(argv)
    cfg = compose_config(list(args.overrides))
    for hospital in hospital_names(cfg.data):
        splits = [hospital_split(cfg.data, hospital, split) for split in ("train", "val")]
        if any(split.masks is None for split in splits):
            print(json.dumps({"hospital": hospital, "skipped": "no masks"}))
            continue
        images = [image for split in splits for image in split.images]
        masks = [mask for split in splits for mask in split.masks]
        for clusters in args.clusters:
            for space, score in hospital_scores(images, masks, clusters).items():
                row = {"hospital": hospital, "clusters": clusters, "space": space, **score}
                print(json.dumps({**row, "images": len(images)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
