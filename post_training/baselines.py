"""Training-free baselines a weakly supervised segmenter has to beat on single-cell crops.

- centred disk: the cell is a disk at the image centre, its radius (a fraction of half the
  shorter side) tuned on the validation split;
- Otsu: Otsu's threshold on a stain channel, holes filled, and only the blob nearest the centre
  kept (the crops are centred on the white cell; red cells and debris lie around it).

Both give the cell the image's own class, the same information the label-masked maps have, so
their class-aware and binary scores are comparable with the weakly supervised stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from common.imaging import blob_nearest_centre, fill_holes, otsu_threshold

StainChannel = Literal["inverted_green", "saturation", "blue_ratio"]


def disk_mask(height: int, width: int, radius_fraction: float) -> np.ndarray:
    """Boolean disk centred in an HxW image, radius = fraction x half the shorter side."""
    ys = np.arange(height) - (height - 1) / 2
    xs = np.arange(width) - (width - 1) / 2
    radius = radius_fraction * min(height, width) / 2
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= radius**2


def _inverted_green(rgb: np.ndarray) -> np.ndarray:
    # Haematoxylin/eosin-like stains absorb green most; plasma and yellow backgrounds do not.
    return 1.0 - rgb[..., 1]


def _saturation(rgb: np.ndarray) -> np.ndarray:
    high, low = rgb.max(-1), rgb.min(-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)


def _blue_ratio(rgb: np.ndarray) -> np.ndarray:
    # Blue relative to red and green: nuclei and basophilic cytoplasm stand out, red cells not.
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return b / (1.0 + r + g)


STAIN_CHANNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "inverted_green": _inverted_green,
    "saturation": _saturation,
    "blue_ratio": _blue_ratio,
}


def stain_channel(image: np.ndarray, channel: StainChannel) -> np.ndarray:
    """One float channel of an HxWx3 uint8 image where stained cells are bright."""
    if channel not in STAIN_CHANNELS:
        raise ValueError(f"unknown stain channel {channel!r}; expected {sorted(STAIN_CHANNELS)}")
    return STAIN_CHANNELS[channel](image.astype(np.float64) / 255.0)


def otsu_mask(image: np.ndarray, channel: StainChannel) -> np.ndarray:
    """Cell mask of one image: Otsu on the stain channel, holes filled, blob nearest the centre."""
    stain = stain_channel(image, channel)
    return blob_nearest_centre(fill_holes(stain >= otsu_threshold(stain)))


def label_cells(cell_masks: Sequence[np.ndarray], labels: Sequence[int]) -> list[np.ndarray]:
    """Boolean cell masks -> label maps {0, label + 1} using each image's own class."""
    return [
        np.where(mask, int(label) + 1, 0).astype(np.uint8)
        for mask, label in zip(cell_masks, labels, strict=True)
    ]
