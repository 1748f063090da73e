"""Dataset-level scores: classification mAP and localization mIoU (method.md section 5)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes present in ``labels`` of the one-vs-rest average precision.

    Absent classes are skipped: a validation split without basophils says nothing about them.
    """
    aps = []
    for c in range(scores.shape[1]):
        positives = labels == c
        if not positives.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = positives[order]
        precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
        aps.append(float(precision_at_hit.mean()))
    return float(np.mean(aps)) if aps else float("nan")


def binary_miou_sweep(
    foreground: torch.Tensor, truth: torch.Tensor, thresholds: Sequence[float]
) -> np.ndarray:
    """Cell-vs-background mIoU of ``foreground >= t`` for every threshold, over the whole split.

    Counts are summed over all pixels of all images before the ratio (dataset-level confusion,
    as in the reference evaluation), so large and small cells weigh by their pixel count.
    """
    truth = truth.bool().flatten()
    scores = foreground.flatten()
    n_truth = truth.sum()
    n_total = truth.numel()
    out = []
    for t in thresholds:
        pred = scores >= t
        tp = (pred & truth).sum()
        n_pred = pred.sum()
        fg_iou = tp / (n_pred + n_truth - tp).clamp(min=1)
        tn = n_total - n_pred - n_truth + tp
        bg_iou = tn / (n_total - tp).clamp(min=1)
        out.append(float((fg_iou + bg_iou) / 2))
    return np.asarray(out)
