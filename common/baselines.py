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
import torch
import torch.nn.functional as F

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


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the histogram cut that maximises the between-class variance.

    Returns the left edge of the first bin of the upper class, so ``values >= t`` is that class.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_below = np.cumsum(counts)[:-1]
    weight_above = values.size - weight_below
    sum_below = np.cumsum(counts * centres)[:-1]
    mean_below = sum_below / np.maximum(weight_below, 1)
    mean_above = (np.sum(counts * centres) - sum_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def connected_components(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a boolean HxW mask (0 = not in the mask).

    Label propagation with hooking and pointer jumping, vectorised in torch: every pixel holds
    a pointer (a 1-based pixel index in its component, initially its own); each round takes
    the largest pointer in the 3x3 neighbourhood, hooks the pointed-to pixel to it as well,
    then follows pointers until they stop changing. Pointers only grow, so every component
    ends on its largest index, in a few rounds even for long thin blobs.

    Returns
    -------
    torch.Tensor
        HxW int64; pixels of one component share the largest pixel index in it.
    """
    inside = torch.as_tensor(np.asarray(mask), dtype=torch.bool)
    height, width = inside.shape
    flat_inside = inside.flatten()
    index = torch.arange(1, height * width + 1, dtype=torch.float64)
    pointer = torch.where(flat_inside, index, 0.0)
    while True:
        grid = pointer.reshape(1, 1, height, width)
        pooled = torch.where(flat_inside, F.max_pool2d(grid, 3, 1, 1).flatten(), 0.0)
        targets = (pointer.long() - 1).clamp(min=0)[flat_inside]
        hooked = pointer.scatter_reduce(0, targets, pooled[flat_inside], "amax")
        hooked = torch.maximum(hooked, pooled)
        while True:
            jumped = torch.where(flat_inside, hooked[(hooked.long() - 1).clamp(min=0)], 0.0)
            jumped = torch.maximum(jumped, hooked)
            if torch.equal(jumped, hooked):
                break
            hooked = jumped
        if torch.equal(hooked, pointer):
            return pointer.reshape(height, width).long()
        pointer = hooked


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Add to a mask every background region that does not touch the image border."""
    background = connected_components(~mask)
    border = torch.cat([background[0], background[-1], background[:, 0], background[:, -1]])
    outside = torch.isin(background, border[border > 0])
    return mask | ~outside.numpy() & (background.numpy() > 0)


def blob_nearest_centre(mask: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` holding the pixel nearest the image centre."""
    if not mask.any():
        return mask.copy()
    labels = connected_components(mask).numpy()
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    distance = (ys - (height - 1) / 2) ** 2 + (xs - (width - 1) / 2) ** 2
    nearest = int(np.argmin(distance))
    return labels == labels[ys[nearest], xs[nearest]]


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
