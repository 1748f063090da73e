"""Training batches, with context-suppression levers behind config switches.

A single-cell crop's background correlates with each domain's class mix, so a classifier can
score well from context alone, and its maps then light the background. Two levers make context
useless for the loss:

- cell-free negatives: crops of the image border, where centred single-cell crops show only
  plasma and red cells, labelled with no class at all. This uses the fact that cells are
  centred: a prior about the data, not a label, and reported as such.
- multi-label mosaics: 2x2 tiles of different images labelled with the union of their classes,
  so a class must be found somewhere in the image rather than read off the whole frame.

Colour jitter (in ``augment``) is the third: domain colour stops predicting class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from common.data import SplitTensors


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Single-cell labels -> the multi-hot float targets of the soft-margin losses."""
    return F.one_hot(labels, num_classes).float()


def border_crops(images: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """One random corner crop per image, ``fraction`` of its side, resized back to full size."""
    n, _, height, width = images.shape
    side_h, side_w = max(int(height * fraction), 2), max(int(width * fraction), 2)
    corners = torch.randint(0, 4, (n,), generator=generator).tolist()
    crops = []
    for image, corner in zip(images, corners, strict=True):
        top = 0 if corner < 2 else height - side_h
        left = 0 if corner % 2 == 0 else width - side_w
        crops.append(image[:, top : top + side_h, left : left + side_w])
    stacked = torch.stack(crops).float()
    resized = F.interpolate(stacked, size=(height, width), mode="bilinear", antialias=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


class BatchBuilder:
    """Draws augmented (images, multi-hot targets) batches from one hospital's cached split."""

    def __init__(
        self,
        data: SplitTensors,
        num_classes: int,
        transform: Callable[[torch.Tensor], torch.Tensor],
        levers: Mapping[str, Any],
        generator: torch.Generator,
    ) -> None:
        self.data = data
        self.num_classes = num_classes
        self.transform = transform
        self.negative_fraction = float(levers["negatives"]["fraction"])
        self.crop_fraction = float(levers["negatives"]["crop"])
        self.mosaic_p = float(levers["mosaic_p"])
        self.generator = generator

    def _targets(self, index: torch.Tensor) -> torch.Tensor:
        return one_hot(self.data.labels[index], self.num_classes)

    def _mosaic(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(0, len(self.data.labels), (4,), generator=self.generator)
        tiles = [self.transform(self.data.images[i]) for i in picks.tolist()]
        half = [
            F.interpolate(t[None], size=(size // 2, size // 2), mode="bilinear")[0] for t in tiles
        ]
        top = torch.cat(half[:2], dim=2)
        bottom = torch.cat(half[2:], dim=2)
        image = F.interpolate(torch.cat([top, bottom], dim=1)[None], size=(size, size))[0]
        return image, self._targets(picks).amax(dim=0)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and targets for one optimizer step over the images at ``index``."""
        images = [self.transform(self.data.images[i]) for i in index.tolist()]
        targets = list(self._targets(index))
        size = images[0].shape[-1]
        if self.mosaic_p > 0:
            draws = torch.rand(len(images), generator=self.generator).tolist()
            for slot, draw in enumerate(draws):
                if draw < self.mosaic_p:
                    images[slot], targets[slot] = self._mosaic(size)
        negatives = round(len(index) * self.negative_fraction)
        if negatives > 0:
            sources = index[torch.randperm(len(index), generator=self.generator)[:negatives]]
            crops = border_crops(self.data.images[sources], self.crop_fraction, self.generator)
            images += [self.transform(crop) for crop in crops]
            targets += [torch.zeros(self.num_classes)] * negatives
        return torch.stack(images), torch.stack(targets)
