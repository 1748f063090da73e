"""Stratified, seeded train/val/test splits of one hospital's images: fixed or k-fold."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.errors import JobError

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.2, 0.2)


def apportion(total: int, fractions: Sequence[float], minimum: int = 0) -> np.ndarray:
    """Divide ``total`` items into integer shares proportional to ``fractions``.

    Largest-remainder rounding keeps the shares as close to the fractions as integers allow and
    makes them sum exactly to ``total``. When there are enough items, every share with a positive
    fraction gets at least ``minimum`` (taken from the largest share), so a rare class still
    appears in every split.

    Parameters
    ----------
    total
        Number of items to divide.
    fractions
        Non-negative weights, one per share; they need not sum to one.
    minimum
        Smallest share for each positive fraction, honoured when ``total`` allows it.

    Returns
    -------
    numpy.ndarray
        int64 shares, one per fraction, summing to ``total``.
    """
    weights = np.asarray(fractions, dtype=np.float64)
    if weights.ndim != 1 or weights.size == 0 or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"fractions must be non-negative with a positive sum, got {fractions}")
    raw = weights / weights.sum() * total
    shares = np.floor(raw).astype(np.int64)
    by_remainder = np.argsort(-(raw - shares), kind="stable")
    shares[by_remainder[: total - int(shares.sum())]] += 1
    eligible = weights > 0
    if total >= minimum * int(eligible.sum()):
        while (shares[eligible] < minimum).any():
            shares[np.flatnonzero(eligible & (shares < minimum))[0]] += 1
            shares[int(np.argmax(shares))] -= 1
    return shares


def split_indices(
    labels: np.ndarray, seed: int, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, np.ndarray]:
    """Split image indices into train/val/test, stratified per class and fixed by ``seed``.

    Each class is shuffled on its own and apportioned by ``fractions``, so every split keeps the
    hospital's class mix; a class with at least three images lands in every split, which keeps
    per-class validation metrics defined.

    Parameters
    ----------
    labels
        ``(N,)`` integer class labels.
    seed
        Seed of the shuffle; the same labels and seed always give the same split.
    fractions
        Train, val and test fractions, summing to one.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``{"train", "val", "test"}`` -> sorted int64 indices; disjoint and covering ``range(N)``.
    """
    if len(fractions) != len(SPLITS) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"need three split fractions summing to 1, got {list(fractions)}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.cumsum(apportion(len(members), fractions, minimum=1))[:-1]
        for split, chunk in zip(SPLITS, np.split(members, bounds), strict=True):
            parts[split].append(chunk)
    return {
        split: np.sort(np.concatenate(chunks or [np.empty(0)])).astype(np.int64)
        for split, chunks in parts.items()
    }


def fold_indices(labels: np.ndarray, seed: int, folds: int, fold: int) -> dict[str, np.ndarray]:
    """Train/val/test of fold ``fold`` of a stratified ``folds``-fold cross-validation.

    Each class is shuffled on its own (fixed by ``seed``) and dealt round-robin to the folds,
    continuing from class to class, so fold sizes differ by at most one and each keeps the
    hospital's class mix. Fold ``fold`` is the test split, the next one (cyclically) the
    validation split, the rest train: over the ``folds`` folds every image is tested once,
    which turns Dataset 2's 9 test images into 52.

    A class's images fall in neighbouring folds, so one of two images would be tested and the
    other validated, leaving the fold to train without a class it is scored on (Dataset 2's
    basophils in fold 0): such a class keeps its validation images for training, unless that
    would leave no validation image at all (a hospital of a few images), which evaluation
    cannot do without. A class of one image cannot be helped; its two folds train without it.
    """
    if folds < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (train, val, test), got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}, got {fold}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    dealt = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == cls)) for cls in np.unique(labels)]
        or [np.empty(0, np.int64)]
    ).astype(np.int64)
    assigned = np.empty(len(labels), np.int64)
    assigned[dealt] = np.arange(len(dealt)) % folds
    split = np.where(assigned == fold, 2, np.where(assigned == (fold + 1) % folds, 1, 0))
    for cls in np.unique(labels):
        members = labels == cls
        moved = members & (split == 1)
        if (
            members.sum() > 1
            and not (split[members] == 0).any()
            and (split == 1).sum() > moved.sum()
        ):
            split[moved] = 0
    return {name: np.flatnonzero(split == code) for code, name in enumerate(SPLITS)}


def train_subset(labels: np.ndarray, train: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A stratified ``share`` of the training indices ``train``; validation and test stay whole.

    For learning curves: how much a hospital's masks gain from more of its own images tells
    whether pooling images across hospitals could help. Each class keeps ``round(share * n)``
    of its training images, at least one, drawn in one fixed order per class, so a smaller
    share is a subset of a larger one and the curve compares nested training sets.

    Parameters
    ----------
    labels
        ``(N,)`` integer class labels of all the hospital's images.
    train
        Sorted indices of the training split.
    share
        Fraction of the training split to keep, in (0, 1].
    seed
        Seed of the per-class order.

    Returns
    -------
    numpy.ndarray
        Sorted int64 indices, a subset of ``train``.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"train_share must be in (0, 1], got {share}")
    if share == 1.0:
        return train
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 1])
    kept = [
        members[: max(1, round(share * len(members)))]
        for cls in np.unique(labels[train])
        for members in [rng.permutation(train[labels[train] == cls])]
    ]
    return np.sort(np.concatenate(kept or [np.empty(0, np.int64)])).astype(np.int64)


def _count(value: Any, key: str) -> int:
    """A whole number >= 0: ``int()`` would cut 1.7 to 1, and a negative seed fails late.

    An int is taken exactly (a float would round a seed above 2^53 to another split).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not number.is_integer() or number < 0:
        raise ValueError(f"{key} must be a whole number >= 0, got {key}={value}")
    return int(number)


@dataclass(frozen=True)
class SplitSpec:
    """How a hospital's images are split: fixed fractions, or one fold of a cross-validation."""

    seed: int
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    folds: int | None = None
    fold: int = 0
    train_share: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.train_share <= 1.0:
            raise ValueError(f"train_share must be in (0, 1], got {self.train_share}")
        if self.folds is None:
            if (
                len(self.fractions) != len(SPLITS)
                or not np.isclose(sum(self.fractions), 1.0)
                or min(self.fractions) < 0
            ):
                raise ValueError(
                    "need three non-negative split fractions summing to 1, got "
                    f"{list(self.fractions)}"
                )
        elif self.folds < 3:
            raise ValueError(f"cross-validation needs at least 3 folds, got folds={self.folds}")
        elif not 0 <= self.fold < self.folds:
            raise ValueError(f"fold must be in 0..{self.folds - 1}, got fold={self.fold}")

    @classmethod
    def of(cls, data_cfg: Any) -> SplitSpec:
        """The ``data.split`` node (``folds: null`` keeps the fixed fractions)."""
        split = data_cfg.split
        folds = split.get("folds")
        return cls(
            seed=_count(split.seed, "seed"),
            fractions=tuple(float(f) for f in split.fractions),
            folds=None if folds is None else _count(folds, "folds"),
            fold=_count(split.get("fold") or 0, "fold"),
            train_share=float(split.get("train_share", 1.0)),
        )

    def indices(self, labels: np.ndarray) -> dict[str, np.ndarray]:
        """Sorted image indices of train, val and test."""
        if self.folds is None:
            parts = split_indices(labels, self.seed, self.fractions)
        else:
            parts = fold_indices(labels, self.seed, self.folds, self.fold)
        parts["train"] = train_subset(labels, parts["train"], self.train_share, self.seed)
        return parts


def check_split(data_cfg: Any) -> SplitSpec:
    """The split of ``data_cfg``, or a one-line :class:`JobError` naming ``data.split``."""
    try:
        return SplitSpec.of(data_cfg)
    except (ValueError, TypeError) as error:
        raise JobError(f"data.split: {error}") from None
