"""Resizing native-size images and label maps to the square inputs the networks take."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
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
