"""Tell whether a trained model's features carry the cell's class, and from which part of the image.

A hospital's classifiers (the class tokens, ``val-accuracy``; the patch-CAM head,
``val-cam-accuracy``) can fail because the heads are weak or because the features hold no class
information at all. This fits a class-balanced linear probe on the frozen final patch features
of the hospital's training images, pooled three ways: over the whole image, under the
foreground head's cell side (oriented as the maps are) and under the rest, and scores it on
validation. A probe at chance means the features, not the heads, limit the hospital; a
background probe as good as the whole image's means the class is read from the context. The
same probe on the pixels themselves (an 8x8 thumbnail, a colour histogram) says how much a
model could get from the images without learning anything. Where the hospital has masks, one
more probe reads what a haematologist reads, measured on the true masks (the nucleus's share of
the cell, its lobes, its outline, the colours of nucleus and cytoplasm): how much of the class
the cell's appearance carries at this site's size, with perfect localization and no learning;
and where every hospital has masks, the same probe fitted on all hospitals' training images
together says whether pooling them, as a federation could, helps a small hospital.

Run from the repository root, on a run of ``benchmarks.localization_levers`` (or on one model
file, such as the model a hospital's post-training job fine-tuned)::

    .venv/bin/python -m benchmarks.feature_probe outputs/levers/runs/contrast_s0
        -- data=wbc_zxaoyou

(one command line). One JSON line per hospital: accuracies on validation (and test with
``--test``) of always answering the training split's most common class, of both heads, and of
the five probes (seven with masks).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.augment import normalise
from common.checkpoint import load_model, run_config
from common.config import compose_config
from common.data import SplitTensors, hospital_names, split_tensors
from common.imaging import connected_components
from common.levers import pooled
from common.localization import oriented_foreground
from common.model import MCTFormerV2
from common.training import shifted, site_label_shift

POOLS = ("all", "cell", "background")
PROBED = (*POOLS, "pixels", "histogram")
HISTOGRAM_BINS = 8  # per channel: 512 colour bins
MORPHOLOGY = "morphology"
POOLED_MORPHOLOGY = "morphology_pooled"
LOBE_SHARE = 0.05  # a nucleus piece smaller than this share of the nucleus is not a lobe


def pixel_features(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, D) features of uint8 (B, 3, H, W) images that involve no model.

    ``pixels``: the 8x8 thumbnail, centred per image (brightness alone does not count);
    ``histogram``: the square root of the joint RGB histogram.
    """
    thumbnail = F.adaptive_avg_pool2d(images.float() / 255.0, 8).flatten(1)
    binned = images.long() * HISTOGRAM_BINS // 256
    index = (binned[:, 0] * HISTOGRAM_BINS + binned[:, 1]) * HISTOGRAM_BINS + binned[:, 2]
    histogram = torch.stack(
        [torch.bincount(i.flatten(), minlength=HISTOGRAM_BINS**3).float() for i in index]
    )
    return {
        "pixels": F.normalize(thumbnail - thumbnail.mean(dim=1, keepdim=True), dim=1),
        "histogram": F.normalize(histogram.sqrt(), dim=1),
    }


def morphology_features(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, 17) measurements of the true cell and nucleus of uint8 images (B, 3, H, W).

    The nucleus's share of the cell, the cell's share of the image, the number of lobes and the
    largest lobe's share of the nucleus, the nucleus's outline squared over its area (lobed and
    kidney-shaped nuclei score high), and the mean and SD of each colour channel over the
    nucleus and over the cytoplasm. ``masks`` are (B, H, W) codes: 1 cytoplasm, 2 nucleus.
    """
    rows = []
    for image, mask in zip(images.float().numpy() / 255.0, masks.numpy(), strict=True):
        nucleus, cell = mask == 2, mask >= 1
        nucleus_area, cell_area = max(int(nucleus.sum()), 1), max(int(cell.sum()), 1)
        pieces = np.bincount(connected_components(nucleus).numpy().ravel())[1:]
        outline = int((nucleus & ~ndimage.binary_erosion(nucleus)).sum())
        row = [
            nucleus.sum() / cell_area,
            cell.sum() / mask.size,
            float((pieces >= LOBE_SHARE * nucleus_area).sum()),
            pieces.max(initial=0) / nucleus_area,
            outline**2 / nucleus_area,
        ]
        for region in (nucleus, cell & ~nucleus):
            pixels = image[:, region] if region.any() else np.zeros((3, 1))
            row += [*pixels.mean(axis=1), *pixels.std(axis=1)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


@torch.no_grad()
def read_split(
    model: MCTFormerV2,
    data: SplitTensors,
    batch_size: int = 64,
    shift: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Features (B, D) per probed kind and both heads' predicted classes (B,) of one split.

    ``shift`` is the hospital's label shift (``common.training.site_label_shift``), added to
    both heads' logits as the hospital's validation does.

    The morphology features are there only for a split with masks.

    The cell side is oriented over the whole split at once, as one batch of maps would be.
    """
    model.eval()
    outputs = [shifted(model(normalise(chunk)), shift) for chunk in data.images.split(batch_size)]
    if any(o.foreground is None or o.patch_features is None for o in outputs):
        raise ValueError("the probe needs a model with a foreground head")
    features = torch.cat([o.patch_features for o in outputs])
    head = torch.cat([o.foreground for o in outputs])
    cell = oriented_foreground(torch.sigmoid(head))
    read = {
        "all": pooled(features, torch.ones_like(cell)),
        "cell": pooled(features, cell),
        "background": pooled(features, 1.0 - cell),
        "tokens": torch.cat([o.class_logits for o in outputs]).argmax(dim=1),
        "cam": torch.cat([o.patch_logits for o in outputs]).argmax(dim=1),
        **pixel_features(data.images),
    }
    if data.masks is not None:
        read[MORPHOLOGY] = morphology_features(data.images, data.masks)
    return read


def training_scale(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and SD of training features (N, D); the SD floored for constant ones."""
    return features.mean(dim=0), features.std(dim=0).clamp_min(1e-6)


def linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int = 500,
    weight_decay: float = 1e-3,
    seed: int = 0,
    standardise: bool = False,
) -> torch.nn.Linear:
    """A softmax classifier on ``features`` (N, D), classes weighted inversely to their count.

    The weighting keeps a probe on a few dozen skewed images from answering the majority
    class, the failure that the heads' accuracy cannot tell from having learnt nothing.
    ``standardise`` scales each feature by its training mean and SD first, for features
    measured in unlike units; the scaling is folded into the returned classifier's weights.
    """
    if standardise:
        mean, scale = training_scale(features)
    else:
        mean, scale = torch.zeros(features.shape[1]), torch.ones(features.shape[1])
    features = (features - mean) / scale
    torch.manual_seed(seed)
    probe = torch.nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=weight_decay)
    counts = torch.bincount(labels, minlength=num_classes).float()
    weight = counts.sum() / (counts.clamp_min(1.0) * num_classes)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(probe(features), labels, weight=weight).backward()
        optimizer.step()
    with torch.no_grad():
        probe.weight.div_(scale)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((predicted == labels).float().mean()), 3)


def probe_hospital(
    model: MCTFormerV2,
    train: SplitTensors,
    evaluated: dict[str, SplitTensors],
    shift: torch.Tensor | None = None,
) -> dict[str, float]:
    """Accuracies per evaluated split: majority class, both heads and the five probes.

    With masks in every split, the morphology probe too. ``shift``: as :func:`read_split`.
    """
    fitted = read_split(model, train, shift=shift)
    probes = {p: linear_probe(fitted[p], train.labels, model.num_classes) for p in PROBED}
    if all(data.masks is not None for data in (train, *evaluated.values())):
        probes[MORPHOLOGY] = linear_probe(
            fitted[MORPHOLOGY], train.labels, model.num_classes, standardise=True
        )
    majority = torch.bincount(train.labels, minlength=model.num_classes).argmax()
    row: dict[str, float] = {}
    for split, data in evaluated.items():
        read = read_split(model, data, shift=shift)
        row[f"majority_{split}"] = accuracy(majority.expand_as(data.labels), data.labels)
        row[f"tokens_{split}"] = accuracy(read["tokens"], data.labels)
        row[f"cam_{split}"] = accuracy(read["cam"], data.labels)
        for pool, probe in probes.items():
            row[f"probe_{pool}_{split}"] = accuracy(probe(read[pool]).argmax(1), data.labels)
    return row


def pooled_morphology_probe(
    sites: dict[str, dict[str, SplitTensors]], num_classes: int
) -> dict[str, dict[str, float]]:
    """Accuracy per hospital and split of one morphology probe fitted on every training split.

    ``sites`` maps each hospital to its splits, "train" among them, all with masks. Each
    hospital scales the measurements by its own training mean and SD, as it could without
    sharing them: a cell's share of the image, for one, depends on the site's magnification,
    and only the standardised values can mean the same at two sites.
    """
    scaled: dict[str, dict[str, torch.Tensor]] = {}
    for hospital, splits in sites.items():
        measured = {s: morphology_features(d.images, d.masks) for s, d in splits.items()}
        mean, scale = training_scale(measured["train"])
        scaled[hospital] = {s: (m - mean) / scale for s, m in measured.items()}
    probe = linear_probe(
        torch.cat([scaled[h]["train"] for h in sites]),
        torch.cat([splits["train"].labels for splits in sites.values()]),
        num_classes,
    )
    return {
        hospital: {
            split: accuracy(probe(scaled[hospital][split]).argmax(1), data.labels)
            for split, data in splits.items()
            if split != "train"
        }
        for hospital, splits in sites.items()
    }


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; options may follow the run, as in ``<run> --test -- <overrides>``.

    Intermixed parsing: plain parsing matches every positional at once, so overrides after
    an option would be refused as unrecognised.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run",
        type=Path,
        help="a training run folder with final_model.pt, or a model file (a post-training "
        "job's personalized_model.pt)",
    )
    parser.add_argument("--test", action="store_true", help="also score the test split")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run's data")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)

    cfg = compose_config(list(args.overrides))
    classes = list(cfg.data.classes)
    splits = ["train", "val", "test"] if args.test else ["train", "val"]
    rows, sites = {}, {}
    checkpoint = args.run if args.run.is_file() else args.run / "final_model.pt"
    for hospital in hospital_names(cfg.data):
        model, payload = load_model(checkpoint, classes, "foreground", hospital)
        read = {s: split_tensors(cfg.data, hospital, s, model.img_size) for s in splits}
        train, evaluated = read.pop("train"), read
        trained = run_config(payload, checkpoint)
        shift = site_label_shift(trained, hospital, train.labels, model.num_classes)
        rows[hospital] = {"run": str(args.run), "hospital": hospital}
        rows[hospital].update(probe_hospital(model, train, evaluated, shift))
        sites[hospital] = {"train": train, **evaluated}
    if all(d.masks is not None for splits in sites.values() for d in splits.values()):
        for hospital, scores in pooled_morphology_probe(sites, len(classes)).items():
            rows[hospital].update({f"probe_{POOLED_MORPHOLOGY}_{s}": a for s, a in scores.items()})
    for row in rows.values():
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
