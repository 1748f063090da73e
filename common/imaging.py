"""Image operations shared by the networks, the pseudo-mask methods and the baselines.

Resizing native-size images and label maps to the square inputs the networks take; Otsu's
threshold and connected-component operations on boolean masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as tvf


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-contiguous writable view or copy: torch warns on the read-only cached data arrays."""
    return np.require(array, requirements=["C", "W"])


def resize_images(images: Sequence[np.ndarray], side: int) -> torch.Tensor:
    """HxWx3 uint8 images of any sizes -> (B, 3, side, side) uint8, antialiased bilinear.

    The aspect ratio is not kept, as in training (single-cell crops are near-square).
    """
    return torch.stack(
        [
            tvf.resize(
                torch.from_numpy(_writable(image)).permute(2, 0, 1),
                [side, side],
                antialias=True,
            )
            for image in images
        ]
    )


def resize_labels(labels: Sequence[np.ndarray], side: int) -> torch.Tensor:
    """HxW uint8 label maps -> (B, side, side) uint8, nearest neighbour so no label is invented."""
    nearest = tvf.InterpolationMode.NEAREST_EXACT
    return torch.stack(
        [
            tvf.resize(
                torch.from_numpy(_writable(label))[None],
                [side, side],
                interpolation=nearest,
            )[0]
            for label in labels
        ]
    )


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
