"""Stratified, seeded train/val/test splits of one hospital's images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
