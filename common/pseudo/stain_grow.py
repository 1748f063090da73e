"""``stain_grow``: the stained nucleus the maps point at, grown into the cell by a tuned margin.

The tiny from-scratch MCT lights nucleus lobes (or, with the patch-CAM, the background), never
the whole cell, and a walk on its patch affinity does not reach the cytoplasm. Nuclei
are the most strongly stained structure of a smear, so colour finds their exact outline once
the background colour is known. This method:

1. models the background colour with k-means on pixels the maps call background (or, with
   ``background_seeds: border``, on the image border: the centred-cell prior), in RGB or, with
   ``colour_space: lab``, in CIE Lab;
2. marks pixels whose colour is far from every background cluster (Otsu on that distance);
3. keeps the blob holding most of the image's map mass (or, with ``pick: centre``, the blob
   nearest the centre: the prior again; ``maps_else_centre`` uses the centre only where the
   image's maps are all zero, which a weak classifier leaves on a third of Dataset 2), lobes
   merged;
4. with ``grow: region``, grows the nucleus into the cell through the connected pixels whose
   colour is still clearly off the background (``cell_fraction`` of the nucleus threshold): the
   cytoplasm is paler than the nucleus but not background-coloured; an opening of
   ``opening`` x the image side cuts thin bridges to touching red cells;
5. scores every pixel by its distance to that nucleus (``grow: radius``) or cell (``region``)
   relative to its radius, so the shared background constant, tuned on validation, sets how far
   the mask reaches beyond it.

The class's own defaults use no prior; the shipped config (``conf/pseudo/stain_grow.yaml``)
turns the prior options on, and the ablation in docs/localization.md reports them next to
the variants without them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from common.imaging import (
    blob_nearest_centre,
    connected_components,
    dilated,
    distance_to,
    fill_holes,
    opened,
    otsu_threshold,
)
from common.pseudo.base import MapRecord, PseudoMasker

BackgroundSeeds = Literal["maps", "border"]
Pick = Literal["maps", "centre", "maps_else_centre"]
Grow = Literal["radius", "region"]
ColourSpace = Literal["rgb", "lab"]
# Colour distances (RGB in [0, 1], Lab / 100) closer than a quarter of an 8-bit grey level are
# one colour: float rounding in the smoothing and k-means leaves an image of exactly one colour
# 1e-4 apart, which Otsu split into a blob (it became all cell). Sensor noise of a blank crop
# spreads further and is still split: a contrast floor would trade against faint cells.
SAME_COLOUR = 1e-3


def _smoothed(image: np.ndarray, kernel: int = 5) -> torch.Tensor:
    """(H, W, 3) float RGB in [0, 1], box-filtered so stain texture does not split regions."""
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    return F.avg_pool2d(x, kernel, 1, kernel // 2, count_include_pad=False)[0].permute(1, 2, 0)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3) sRGB in [0, 1] -> CIE Lab (D65) divided by 100, so L is in [0, 1].

    Lab separates lightness from chroma: the pale cytoplasm of Dataset 2 is nearly as light as
    its background but of another hue, which a Euclidean RGB distance underrates.
    """
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = torch.tensor(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]
    )
    xyz = linear @ to_xyz.T / torch.tensor([0.95047, 1.0, 1.08883])
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0) ** (1 / 3), 7.787 * xyz + 16 / 116)
    lightness = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return torch.stack([lightness, a, b], -1) / 100


def kmeans(points: torch.Tensor, k: int, iterations: int = 10, seed: int = 0) -> torch.Tensor:
    """(k, D) centroids of (N, D) points (Lloyd's algorithm, seeded, fixed iterations)."""
    generator = torch.Generator().manual_seed(seed)
    k = min(k, len(points))
    centres = points[torch.randperm(len(points), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centres[j] = members.mean(0)
    return centres


class StainGrowMasker(PseudoMasker):
    """Colour-exact nucleus chosen by the maps, scored by distance relative to its radius."""

    name = "stain_grow"
    # Its scores are closeness to the grown cell in the labelled class's channel, made to be
    # cut by one constant; the maps' own (1 - max)^alpha background is not on that scale.
    backgrounds = ("constant",)

    def __init__(
        self,
        background_seeds: BackgroundSeeds = "maps",
        pick: Pick = "maps",
        seed_quantile: float = 0.4,
        clusters: int = 3,
        reach: float = 2.0,
        grow: Grow = "radius",
        cell_fraction: float = 0.3,
        opening: float = 0.05,
        colour_space: ColourSpace = "rgb",
    ) -> None:
        if background_seeds not in ("maps", "border"):
            raise ValueError(
                f"background_seeds must be 'maps' or 'border', got {background_seeds!r}"
            )
        if pick not in ("maps", "centre", "maps_else_centre"):
            raise ValueError(f"pick must be 'maps', 'centre' or 'maps_else_centre', got {pick!r}")
        if grow not in ("radius", "region"):
            raise ValueError(f"grow must be 'radius' or 'region', got {grow!r}")
        if colour_space not in ("rgb", "lab"):
            raise ValueError(f"colour_space must be 'rgb' or 'lab', got {colour_space!r}")
        if not 0 < seed_quantile < 1 or clusters < 1 or reach <= 0:
            raise ValueError("seed_quantile must be in (0, 1), clusters >= 1 and reach > 0")
        if not 0 < cell_fraction < 1 or not 0 <= opening < 0.5:
            raise ValueError("cell_fraction must be in (0, 1) and opening in [0, 0.5)")
        self.background_seeds = background_seeds
        self.pick = pick
        self.seed_quantile = seed_quantile
        self.clusters = clusters
        self.reach = reach
        self.grow = grow
        self.cell_fraction = cell_fraction
        self.opening = opening
        self.colour_space = colour_space

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> StainGrowMasker:
        """Options of ``conf/pseudo/stain_grow.yaml``."""
        keys = (
            "background_seeds",
            "pick",
            "seed_quantile",
            "clusters",
            "reach",
            "grow",
            "cell_fraction",
            "opening",
            "colour_space",
        )
        return cls(**{key: cfg[key] for key in keys if key in cfg})

    @classmethod
    def unused_options(cls, cfg: Mapping[str, Any]) -> frozenset[str]:
        """``cell_fraction`` when the nucleus grows by a radius, not through its region."""
        grows_by_radius = cfg.get("grow", "radius") == "radius"
        return frozenset({"cell_fraction"}) if grows_by_radius else frozenset()

    def _background_pixels(self, record: MapRecord, colour: torch.Tensor) -> torch.Tensor:
        height, width = colour.shape[:2]
        if self.background_seeds == "border":
            ring = max(2, min(height, width) // 12)
            inside = torch.zeros(height, width, dtype=torch.bool)
            inside[ring:-ring, ring:-ring] = True
            seeds = ~inside
        else:
            cell_map = record.maps.amax(0)
            seeds = cell_map <= torch.quantile(cell_map.flatten(), self.seed_quantile)
        pixels = colour[seeds]
        return pixels[:: max(1, len(pixels) // 3000)]

    def _background_distance(self, record: MapRecord) -> torch.Tensor:
        """(H, W) colour distance of every pixel to the nearest background colour cluster.

        Memoised on the record: the options tuned on validation (``cell_fraction``) leave it
        unchanged, and the k-means is most of the method's cost.
        """
        key = (
            self.name,
            self.background_seeds,
            self.seed_quantile,
            self.clusters,
            self.colour_space,
        )
        if key not in record.memo:
            record.memo[key] = self._colour_distance(record)
        return record.memo[key]

    def _colour_distance(self, record: MapRecord) -> torch.Tensor:
        colour = _smoothed(record.image)
        if self.colour_space == "lab":
            colour = rgb_to_lab(colour)
        centres = kmeans(self._background_pixels(record, colour), self.clusters)
        height, width = colour.shape[:2]
        return torch.cdist(colour.reshape(-1, 3), centres).amin(1).reshape(height, width)

    def nucleus(self, record: MapRecord) -> torch.Tensor:
        """(H, W) bool: the stained blob this image's maps point at (may be empty)."""
        return self._nucleus(record, self._background_distance(record))

    def cell(self, record: MapRecord) -> torch.Tensor:
        """(H, W) bool: the nucleus grown through off-background pixels, holes filled."""
        distance = self._background_distance(record)
        nucleus = self._nucleus(record, distance)
        if not nucleus.any():
            return nucleus
        candidates = distance >= self.cell_fraction * otsu_threshold(distance.numpy())
        height, width = distance.shape
        kernel = round(self.opening * min(height, width)) | 1
        if kernel > 1:
            candidates = opened(candidates, kernel)
        labels = connected_components(candidates | nucleus)
        touched = torch.unique(labels[nucleus])
        return torch.as_tensor(fill_holes(torch.isin(labels, touched[touched > 0]).numpy()))

    def _nucleus(self, record: MapRecord, distance: torch.Tensor) -> torch.Tensor:
        """The Otsu-stained blob chosen by the maps (or the centre), lobes merged for the choice."""
        height, width = distance.shape
        if float(distance.max() - distance.min()) < SAME_COLOUR:
            return torch.zeros_like(distance, dtype=torch.bool)
        stained = distance >= otsu_threshold(distance.numpy())
        reach = max(3, round(min(height, width) / 30)) | 1
        merged = dilated(stained, reach)
        if not merged.any():
            return stained
        if self.pick != "centre":
            labels = connected_components(merged)
            cell_map = record.maps.amax(0).flatten()
            mass = torch.zeros(int(labels.max()) + 1).index_add_(0, labels.flatten(), cell_map)
            if float(mass[1:].max()) > 0:
                mass[0] = -1.0
                return stained & (labels == int(mass.argmax()))
            # The maps point at no blob (all zero, say). Without the centre to fall back on
            # they choose none: the first blob in scan order would be a hidden top-left prior
            # in the one setting that claims to use none.
            if self.pick == "maps":
                return torch.zeros_like(stained)
        return stained & torch.as_tensor(blob_nearest_centre(merged.numpy()))

    def propagate(
        self, records: Sequence[MapRecord], scores: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The labelled class: 1 on the nucleus (or cell), falling linearly to 0 at ``reach`` radii.

        The weak label, not the maps, says which class is present: the maps of a weak classifier
        are all zero on some images, and the cell is still there.
        """
        out = []
        for record, image_scores in zip(records, scores, strict=True):
            core = self.cell(record) if self.grow == "region" else self.nucleus(record)
            grown = torch.zeros_like(image_scores)
            if core.any():
                radius = float(np.sqrt(float(core.sum()) / np.pi))
                closeness = (1 - distance_to(core) / (self.reach * radius)).clamp(min=0)
                grown[record.label] = closeness.to(grown.dtype)
            out.append(grown)
        return out
