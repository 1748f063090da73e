"""Dataset-level scores: classification mAP and localization mIoU (docs/method.md section 5)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import numpy as np
import torch


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes present in ``labels`` of the one-vs-rest average precision.

    Absent classes are skipped: a validation split without basophils says nothing about them.
    Tied scores are one threshold (as in scikit-learn): ranked by their order in the split
    instead, a classifier that gives every image the same score (saturated float32 sigmoids
    do) would score above chance for the classes read first.
    """
    aps = []
    for c in range(scores.shape[1]):
        positives = labels == c
        if not positives.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        ranked, hits = scores[order, c], positives[order]
        # The last rank of each group of equal scores: the thresholds.
        ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))
        found = np.cumsum(hits)[ends]
        recall_gained = np.diff(found, prepend=0) / positives.sum()
        aps.append(float((recall_gained * found / (ends + 1)).sum()))
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


AbsentPolicy = Literal["skip", "zero"]
IGNORE_INDEX = 255


def confusion_matrix(
    prediction: np.ndarray | torch.Tensor,
    truth: np.ndarray | torch.Tensor,
    num_labels: int,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Count (truth, prediction) label pairs of one image or a whole stack of them.

    Pixels whose truth is ``ignore_index`` (or any label outside ``[0, num_labels)``) are left
    out, as torchvision's reference ``ConfusionMatrix`` does, so uncertain regions never count.

    Parameters
    ----------
    prediction, truth
        Integer label maps of the same shape.
    num_labels
        Size K of the label space (background included).
    ignore_index
        Truth value to skip.

    Returns
    -------
    numpy.ndarray
        ``(K, K)`` int64 counts, rows = truth, columns = prediction; add them over images for the
        dataset-level matrix of docs/method.md section 5.
    """
    if tuple(prediction.shape) != tuple(truth.shape):
        raise ValueError(
            f"prediction is {tuple(prediction.shape)} but truth {tuple(truth.shape)}: a map "
            "turned or resized against its truth cannot be scored"
        )
    pred = np.asarray(prediction).astype(np.int64).ravel()
    true = np.asarray(truth).astype(np.int64).ravel()
    keep = (true != ignore_index) & (true >= 0) & (true < num_labels)
    if ((pred[keep] < 0) | (pred[keep] >= num_labels)).any():
        raise ValueError(f"prediction holds labels outside [0, {num_labels})")
    counts = np.bincount(true[keep] * num_labels + pred[keep], minlength=num_labels**2)
    return counts.reshape(num_labels, num_labels)


def class_iou(matrix: np.ndarray, absent: AbsentPolicy = "skip") -> np.ndarray:
    """Per-label IoU = TP / (truth + predicted - TP) of a dataset-level confusion matrix.

    The two references disagree on a label that is neither in the truth nor predicted (union 0):
    the segmentation metric (``nanmean``) skips it (``"skip"`` -> NaN here), the seed evaluation
    scores it 0 (``"zero"``). A label predicted but absent from the truth is 0 under both.

    Parameters
    ----------
    matrix
        ``(K, K)`` counts from :func:`confusion_matrix`.
    absent
        ``"skip"`` or ``"zero"``.

    Returns
    -------
    numpy.ndarray
        ``(K,)`` float64 IoU per label; NaN marks a skipped label.
    """
    if absent not in ("skip", "zero"):
        raise ValueError(f"absent must be 'skip' or 'zero', got {absent!r}")
    matrix = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(matrix)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
    return np.where(union > 0, iou, np.nan if absent == "skip" else 0.0)


def mean_iou(matrix: np.ndarray, absent: AbsentPolicy = "skip") -> float:
    """Mean of :func:`class_iou` over labels, background included (NaN when nothing counts)."""
    iou = class_iou(matrix, absent)
    return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")


def binary_confusion(matrix: np.ndarray) -> np.ndarray:
    """Collapse a class-aware (background + C) matrix into cell vs background (2 x 2).

    A cell predicted as the wrong type is still a cell here: this is the class-blind view
    (option B of docs/method.md section 5).
    """
    matrix = np.asarray(matrix)
    return np.array(
        [
            [matrix[0, 0], matrix[0, 1:].sum()],
            [matrix[1:, 0].sum(), matrix[1:, 1:].sum()],
        ],
        dtype=np.int64,
    )


def class_aware_truth(mask: np.ndarray, label: int) -> np.ndarray:
    """Ground-truth codes {0 bg, 1 cytoplasm, 2 nucleus} of a single-cell image -> {0, label+1}.

    The whole cell (cytoplasm and nucleus) takes the image's class, the label space in which
    pseudo-masks and the segmenter predict.
    """
    return np.where(np.asarray(mask) > 0, label + 1, 0).astype(np.uint8)


def class_aware_truths(masks: Sequence[np.ndarray], labels: Sequence[int]) -> list[np.ndarray]:
    """:func:`class_aware_truth` of every image of a split, masks and labels in step."""
    return [class_aware_truth(mask, int(label)) for mask, label in zip(masks, labels, strict=True)]


@dataclass(frozen=True)
class SegmentationScores:
    """mIoU of one set of predictions in both label spaces of docs/method.md section 5.

    Attributes
    ----------
    class_aware_miou
        Mean IoU over background + C classes (option A): a wrong cell type counts as wrong.
    binary_miou
        Mean of the background and cell IoU (option B).
    class_iou
        Per-label IoU of the class-aware matrix (NaN: skipped absent label).
    absent
        The absent-class policy used for the class-aware mean.
    cell_types
        Images by true and named cell type (:func:`cell_type_confusion`); None where the
        predictions were given the image's label, so they name no type of their own.
    """

    class_aware_miou: float
    binary_miou: float
    class_iou: tuple[float, ...]
    absent: AbsentPolicy
    cell_types: tuple[tuple[int, ...], ...] | None = None

    @property
    def cell_type_accuracy(self) -> float | None:
        """Share of the images whose type is named rightly; None without :attr:`cell_types`."""
        if self.cell_types is None:
            return None
        return cell_type_accuracy(np.asarray(self.cell_types))

    @classmethod
    def from_confusion(cls, matrix: np.ndarray, absent: AbsentPolicy) -> SegmentationScores:
        """Score a class-aware confusion matrix."""
        return cls(
            class_aware_miou=mean_iou(matrix, absent),
            binary_miou=mean_iou(binary_confusion(matrix), absent),
            class_iou=tuple(float(v) for v in class_iou(matrix, absent)),
            absent=absent,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (NaN becomes None, which JSON can hold)."""
        scores = {
            "class_aware_miou": _finite_or_none(self.class_aware_miou),
            "binary_miou": _finite_or_none(self.binary_miou),
            "class_iou": [_finite_or_none(v) for v in self.class_iou],
            "absent": self.absent,
        }
        if self.cell_types is not None:
            scores["cell_type_accuracy"] = _finite_or_none(self.cell_type_accuracy)
            scores["cell_type_confusion"] = [list(row) for row in self.cell_types]
        return scores


def cell_type_confusion(
    predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], num_labels: int
) -> np.ndarray:
    """How many images of each true cell type were named as each type, by most cell pixels.

    A single-cell image has one type, and the class-aware mIoU cannot say how many images a
    segmenter names rightly, nor which types it mistakes for which: it weighs pixels, so one
    large cell of the wrong type costs more than two small ones. Rows are the true cell labels
    1 .. ``num_labels`` - 1; column 0 counts the images with no predicted cell pixel (no type
    named), column k the images named label k. An image whose truth holds no cell has no type
    and is left out.
    """
    matrix = np.zeros((num_labels - 1, num_labels), dtype=np.int64)
    for pred, true in zip(predictions, truths, strict=True):
        cell = _cell_labels(true)
        if cell.size == 0:
            continue
        named = np.bincount(_cell_labels(pred))
        matrix[int(np.bincount(cell).argmax()) - 1, int(named.argmax()) if named.any() else 0] += 1
    return matrix


def _cell_labels(label_map: np.ndarray) -> np.ndarray:
    """The labels of a map's cell pixels, flat: neither background nor ignored."""
    labels = np.asarray(label_map).ravel()
    return labels[(labels > 0) & (labels != IGNORE_INDEX)]


def cells_named_rightly(confusion: np.ndarray) -> int:
    """How many images of a :func:`cell_type_confusion` were named their true type."""
    return int(np.trace(confusion[:, 1:]))


def cell_type_accuracy(confusion: np.ndarray) -> float:
    """Share of the images of a :func:`cell_type_confusion` named rightly (NaN when none)."""
    counted = int(confusion.sum())
    return cells_named_rightly(confusion) / counted if counted else float("nan")


def score_label_maps(
    predictions: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    num_labels: int,
    absent: AbsentPolicy = "skip",
    cell_types: bool = False,
) -> SegmentationScores:
    """Score predicted label maps against truth over a whole split (one summed matrix).

    Parameters
    ----------
    predictions, truths
        Per-image label maps in {0 bg, k = class k-1 + 1}; truth may hold the ignore label 255.
    num_labels
        Background + C.
    absent
        Absent-class policy of the class-aware mean.
    cell_types
        Also count :func:`cell_type_confusion`: for predictions that name the cell type
        themselves, not those given the image's label.

    Returns
    -------
    SegmentationScores
        Class-aware and binary mIoU (and the cell types named).
    """
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} truths")
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    for pred, true in zip(predictions, truths, strict=True):
        matrix += confusion_matrix(pred, true, num_labels)
    scores = SegmentationScores.from_confusion(matrix, absent)
    if not cell_types:
        return scores
    confusion = cell_type_confusion(predictions, truths, num_labels)
    return replace(scores, cell_types=tuple(tuple(int(n) for n in row) for row in confusion))


def _finite_or_none(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


SelectBy = Literal["class_aware", "binary"]
Candidate = TypeVar("Candidate")


def select_on_validation(
    candidates: Sequence[Candidate],
    predict: Callable[[Candidate], Sequence[np.ndarray]],
    truths: Sequence[np.ndarray],
    num_labels: int,
    *,
    absent: AbsentPolicy = "skip",
    select_by: SelectBy = "class_aware",
) -> tuple[Candidate, SegmentationScores]:
    """The candidate whose predictions score best on a (validation) split; ties keep the first.

    Only ever pass validation truths here: the reference tunes its seed threshold on the very
    masks it reports (docs/method.md section 5), which flatters the number.

    Parameters
    ----------
    candidates
        Values to try (thresholds, radii, channel names, ...).
    predict
        Candidate -> one label map per image of the split.
    truths
        Class-aware ground truth of the same images.
    num_labels
        Background + C.
    absent
        Absent-class policy.
    select_by
        ``"class_aware"`` or ``"binary"`` mIoU.

    Returns
    -------
    tuple
        The best candidate and its scores.
    """
    if not candidates:
        raise ValueError("nothing to select from: the candidate list is empty")
    scored = [
        (candidate, score_label_maps(predict(candidate), truths, num_labels, absent))
        for candidate in candidates
    ]
    values = [_selected(scores, select_by) for _, scores in scored]
    return scored[int(np.nanargmax(values))] if not np.isnan(values).all() else scored[0]


def _selected(scores: SegmentationScores, select_by: SelectBy) -> float:
    if select_by == "class_aware":
        return scores.class_aware_miou
    if select_by == "binary":
        return scores.binary_miou
    raise ValueError(f"select_by must be 'class_aware' or 'binary', got {select_by!r}")
