"""The supervised ceiling: the post-training segmenter trained on the TRUE training masks.

This is the one place that trains on ground truth, on purpose: it measures how far the weakly
supervised pipeline is from what expert masks would give. ``train_segmenter`` refuses ground
truth when told what the ground truth is (its leak guard protects the weak pipeline), so this
path calls it without ``ground_truth=``; nothing here feeds any other regime.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.checkpoint import save_atomic
from common.data import HospitalData, hospital_split
from common.metrics import SegmentationScores, class_aware_truths, score_label_maps
from common.segmenter import (
    Decoding,
    create_segmenter,
    predict,
    segmenter_payload,
    train_segmenter,
)
from common.training import resolve_device
from post_training.artifacts import sample_stems, save_label_png
from post_training.stages import SEGMENTER, headline_scores

log = logging.getLogger(__name__)


def true_labels(data: HospitalData) -> list[np.ndarray]:
    """Class-aware ground truth of a split (0 background, label + 1 for the cell)."""
    if data.masks is None:
        raise ValueError(f"hospital {data.name} has no ground-truth masks: no supervised ceiling")
    return class_aware_truths(data.masks, data.labels)


def train_on_true_masks(cfg: DictConfig, hospitals: Sequence[str]) -> tuple[nn.Module, float]:
    """Train the configured segmenter on the training splits of ``hospitals`` with true masks.

    Several hospitals pool their images in one training set: what a segmenter shared between
    the sites could at best learn, had every site's expert masks been in one place.

    Returns
    -------
    tuple
        The trained segmenter and its last epoch's mean training loss: a ceiling that did not
        fit its true masks is no ceiling.
    """
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for hospital in hospitals:
        train = hospital_split(cfg.data, hospital, "train")
        images += list(train.images)
        labels += true_labels(train)
    seg_cfg = OmegaConf.to_container(cfg.segmenter, resolve=True)
    model = create_segmenter(seg_cfg, len(cfg.data.classes) + 1, seed=int(cfg.seed))
    losses = train_segmenter(
        model,
        images,
        labels,
        seg_cfg,
        device=resolve_device(str(cfg.device)),
        seed=int(cfg.seed),
    )
    log.info(
        "true-mask segmenter on %s: final training loss %.4f", ", ".join(hospitals), losses[-1]
    )
    return model, losses[-1]


def train_supervised_ceiling(cfg: DictConfig, hospital: str, out: Path) -> tuple[nn.Module, float]:
    """Train the ceiling at ``hospital`` (:func:`train_on_true_masks`); write ``segmenter.pt``.

    ``cfg`` is a composed post-training config (``conf/postprocess.yaml``): the segmenter, its
    training settings and the data are the weak pipeline's own, so only the labels differ.
    """
    model, loss = train_on_true_masks(cfg, [hospital])
    seg_cfg = OmegaConf.to_container(cfg.segmenter, resolve=True)
    save_atomic(segmenter_payload(model, seg_cfg, list(cfg.data.classes)), out / "segmenter.pt")
    return model, loss


def predict_and_score(
    model: nn.Module, cfg: DictConfig, hospital: str, split: str
) -> tuple[HospitalData, list[np.ndarray], SegmentationScores]:
    """A segmenter's label maps on one split of ``hospital`` and their scores with cell types."""
    data = hospital_split(cfg.data, hospital, split)
    predicted = predict(
        model,
        data.images,
        int(cfg.segmenter.input_size),
        device=resolve_device(str(cfg.device)),
        batch_size=int(cfg.batch_size),
        decoding=Decoding.of(cfg.segmenter),
    )
    scores = score_label_maps(
        predicted,
        true_labels(data),
        len(cfg.data.classes) + 1,
        cfg.evaluation.absent,
        cell_types=True,
    )
    return data, predicted, scores


def score_segmenter(model: nn.Module, cfg: DictConfig, hospital: str, out: Path) -> dict:
    """Test-split scores of a segmenter at ``hospital``; label maps saved for the overlay grid.

    Returns
    -------
    dict
        ``{"segmenter": headline scores}``, the cell format of the matrix, with the share of
        the cells whose type it names rightly: what the weak pipeline's segmenter could name
        with true masks.
    """
    test, predicted, scores = predict_and_score(model, cfg, hospital, "test")
    for stem, labels in zip(sample_stems(test.sample_ids), predicted, strict=True):
        save_label_png(out / "predictions" / "test" / f"{stem}.png", labels)
    return {SEGMENTER: headline_scores(scores.to_dict())}
