"""Training losses that make the class-agnostic foreground head find the cell.

Trained from scratch on a few hundred crops, the MCT class maps light whatever predicts the
label, often the background (docs/localization.md). These losses train the model's foreground
head (``model.foreground_head``), a per-patch cell-vs-background score M in [0, 1], from the
image labels alone, without assuming where the cell is:

- background activation suppression (BAS, Wu et al., CVPR 2022): the patch features outside M,
  passed through the same CAM head, must score no class at all, and those inside M the image's
  classes; an area term keeps M from covering everything. M must then hold every part of the
  image that carries class evidence, and nothing more: the whole cell, not its nucleus only;
- foreground contrast (C2AM, Xie et al., CVPR 2022): the pooled features under M of two images
  are alike, those outside M are alike, and foreground and background differ, so M splits the
  image into the one object and the repetitive background (plasma, red cells) the same way in
  every image. The split has no sign; ``common.localization.oriented_foreground`` takes the
  smaller side as the cell;
- size constraint (Kervadec et al., MedIA 2019): the cell side's share of each image must lie
  within bounds known from the domain (a single-cell crop), a penalty only outside them. Unlike
  the area term it does not push every mask smaller, nor, once inside the bounds, larger;
- compactness: the cell side's second moment about its own centroid, against that of a disk
  of the same area, so that a mask that grows takes the pixels next to the cell before those
  of a neighbouring red cell. It assumes one compact cell per crop, not where it lies.

Weights live under ``train.levers.foreground``; all zero (the default) adds nothing.

One lever changes the batch instead of the loss: cell copy-paste (:func:`paste_cells`, Ghiasi
et al., CVPR 2021, with the masks taken from the model's own head) moves cells onto other
images' backgrounds, so that neither the label nor the cell side can be read off the context.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.localization import oriented_foreground
from common.model import MCTOutput


def masked_logits(head: nn.Module, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Class scores (B, C) of the CAM head on ``features`` (B, D, h, w) weighted by ``mask``.

    The head is the model's own patch-CAM head, so "scores no class outside the mask" speaks
    about the very maps that post-training thresholds.
    """
    return F.adaptive_avg_pool2d(head(features * mask), 1).flatten(1)


def suppression_loss(
    head: nn.Module, features: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """BAS: foreground under ``mask`` classifies as ``targets``, the rest as no class.

    Parameters
    ----------
    head
        The CAM head (a conv D -> C).
    features
        (B, D, h, w) patch features.
    mask
        (B, 1, h, w) foreground probabilities M.
    targets
        (B, C) multi-hot labels; an all-zero row (a cell-free crop) is all background,
        whatever its mask.

    Returns
    -------
    torch.Tensor
        Scalar: soft-margin loss of the foreground scores plus that of the background scores
        against no class.
    """
    labelled = targets.sum(dim=1) > 0
    foreground = masked_logits(head, features, mask)
    # A cell-free crop is background everywhere: its mask may not hide evidence from the loss.
    outside = torch.where(labelled[:, None, None, None], 1.0 - mask, torch.ones_like(mask))
    background = masked_logits(head, features, outside)
    fg_loss = (
        F.multilabel_soft_margin_loss(foreground[labelled], targets[labelled])
        if labelled.any()
        else foreground.sum() * 0.0
    )
    return fg_loss + F.multilabel_soft_margin_loss(background, torch.zeros_like(targets))


def area_loss(mask: torch.Tensor) -> torch.Tensor:
    """Mean foreground fraction, so that M cannot be everything (BAS's area constraint)."""
    return mask.mean()


# The weights of ``train.levers.foreground``; its other key, ``size_bounds``, is not a weight.
LEVER_WEIGHTS = ("suppression", "area", "contrast", "size", "compact")


def head_levers(levers: Mapping[str, Any]) -> dict[str, Any]:
    """The switched-on levers of a ``train.levers`` node that need the foreground head.

    Keyed by their path under ``train.levers`` (``foreground.compact``, ``copy_paste``): the
    foreground weights train the head and copy-paste moves the cells it marks. Keys the node
    lacks (a partial override such as ``personalize.train.levers``) count as off.
    """
    foreground = levers.get("foreground") or {}
    named = {f"foreground.{key}": foreground.get(key) for key in LEVER_WEIGHTS}
    named["copy_paste"] = levers.get("copy_paste")
    return {key: value for key, value in named.items() if value and float(value) != 0.0}


def size_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as floats, or a ValueError that names the setting."""
    try:
        shown = list(bounds)
        low, high = (float(b) for b in shown)
    except (TypeError, ValueError):
        shown, low, high = bounds, float("nan"), float("nan")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(
            f"train.levers.foreground.size_bounds={shown}: expected [low, high] with "
            "0 <= low < high <= 1 (the share of a crop a cell covers)"
        )
    return low, high


def size_loss(mask: torch.Tensor, bounds: Sequence[float]) -> torch.Tensor:
    """Squared share of each image by which the cell side falls outside ``bounds``, batch mean.

    The cell side is the head's smaller side (:func:`oriented_foreground`), so the constraint
    speaks about the mask post-training reads, whichever sign the contrast gave the head.

    Parameters
    ----------
    mask
        (B, 1, h, w) foreground probabilities M.
    bounds
        (low, high): the share of a crop a cell covers, e.g. (0.15, 0.5).
    """
    low, high = size_bounds(bounds)
    share = oriented_foreground(mask).mean(dim=(1, 2, 3))
    return (F.relu(low - share) ** 2 + F.relu(share - high) ** 2).mean()


def compactness_loss(mask: torch.Tensor) -> torch.Tensor:
    """How far the cell side is from a disk: its moment of inertia over a disk's, minus 1.

    For any mask with values in [0, 1] the disk of the same area has the smallest second
    moment about the centroid (A^2 / 2 pi), so the ratio is at least 1 and grows as the mask
    spreads or splits. For a mask of 0 and 1 it does not change with the mask's size or
    position; a soft one scores higher the fainter it is (a disk at probability p scores about
    1/p), so the term also asks for a confident mask, and an image without a cell side (a
    cell-free crop) would dominate it: :func:`foreground_loss` leaves those out. Each patch
    counts as a unit square (its own moment 1/6), so a single patch is not more compact than a
    disk.

    Parameters
    ----------
    mask
        (B, 1, h, w) foreground probabilities M; the cell side is taken as
        :func:`oriented_foreground` takes it.
    """
    cell = oriented_foreground(mask)[:, 0]
    h, w = cell.shape[1:]
    rows = torch.arange(h, dtype=cell.dtype, device=cell.device)[:, None]
    cols = torch.arange(w, dtype=cell.dtype, device=cell.device)[None, :]
    area = cell.sum(dim=(1, 2)).clamp_min(1e-6)
    row_c = (cell * rows).sum(dim=(1, 2)) / area
    col_c = (cell * cols).sum(dim=(1, 2)) / area
    spread = (rows - row_c[:, None, None]) ** 2 + (cols - col_c[:, None, None]) ** 2
    moment = (cell * spread).sum(dim=(1, 2)) + area / 6.0
    return (moment * 2.0 * math.pi / area**2 - 1.0).mean()


def paste_share(value: Any) -> float:
    """``train.levers.copy_paste`` as a float, or a ValueError that names the setting."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 <= share <= 1.0:
        raise ValueError(
            f"train.levers.copy_paste={value}: expected a share of the batch in [0, 1]"
        )
    return share


def paste_cells(
    images: torch.Tensor, targets: torch.Tensor, cell: torch.Tensor, share: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the cells of some images over the backgrounds of others, labels following the cell.

    Each receiving image first loses its own cell: the pixels of its cell side are painted in
    the mean colour of the rest of the image, so that the composite holds one cell and its
    label is the donor's alone. The cell side is the head's thresholded at 0.5 and grown by
    one patch, because the head marks the stained nucleus before the pale cytoplasm around it
    (docs/localization.md); the pasted piece carries that rim with it.

    Parameters
    ----------
    images
        (B, 3, H, W) training images.
    targets
        (B, C) multi-hot labels.
    cell
        (B, 1, h, w) cell-side probabilities on the patch grid (the oriented foreground).
    share
        Fraction of the batch that receives a pasted cell, in [0, 1]; the receivers and their
        donors (always another image) come from torch's global generator, which the local
        training seeds.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        New images and targets; the inputs are not modified. A donor whose cell side is empty
        leaves its receiver as it was.
    """
    b = images.shape[0]
    count = round(paste_share(share) * b)
    if count == 0 or b < 2:
        return images, targets
    grown = F.max_pool2d((cell > 0.5).to(images.dtype), 3, stride=1, padding=1)
    region = F.interpolate(grown, size=images.shape[2:], mode="nearest")
    receivers = torch.randperm(b)[:count]
    donors = (receivers + torch.randint(1, b, (count,))) % b
    # Drawn on the CPU, so a seed gives the same draws on every device; used where the images
    # are (a CPU index tensor cannot take a CUDA mask).
    receivers, donors = receivers.to(images.device), donors.to(images.device)
    outside = 1.0 - region
    background = (images * outside).sum(dim=(2, 3)) / outside.sum(dim=(2, 3)).clamp_min(1.0)
    erased = images * outside + background[:, :, None, None] * region
    pasted = erased[receivers] * (1.0 - region[donors]) + images[donors] * region[donors]
    has_cell = region[donors].flatten(1).amax(dim=1) > 0
    images, targets = images.clone(), targets.clone()
    images[receivers[has_cell]] = pasted[has_cell]
    targets[receivers[has_cell]] = targets[donors[has_cell]]
    return images, targets


def pooled(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean feature per image, L2-normalised: (B, D)."""
    weight = mask.flatten(2)
    summed = (features.flatten(2) * weight).sum(dim=2) / (weight.sum(dim=2) + 1e-6)
    return F.normalize(summed, dim=1)


def contrast_loss(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """C2AM: foregrounds alike, backgrounds alike, foreground unlike background, across images.

    Similarities are cosines mapped to [0, 1]; positives (fg-fg and bg-bg of two different
    images) enter as -log s, negatives (fg of one image, bg of any image) as -log(1 - s).

    The loss is symmetric under swapping M and 1 - M: it finds the split, not its sign, and
    in the measured runs it called the background foreground. Making foregrounds attract only
    within a class (the weak labels) did not change that, so the sign is left to
    ``common.localization.oriented_foreground``.

    Parameters
    ----------
    features
        (B, D, h, w) patch features; B >= 2 for the positive pairs.
    mask
        (B, 1, h, w) foreground probabilities M.

    Returns
    -------
    torch.Tensor
        Scalar loss; 0 only when every foreground is identical, every background is identical,
        and each foreground is opposite to each background.
    """
    # In float32 whatever the autocast: in float16 the clamp's 1 - 1e-4 rounds to 1, and two
    # alike features (common at the first steps) make -log(1 - s) infinite. B x B products
    # cost nothing next to the model.
    with torch.autocast(features.device.type, enabled=False):
        features, mask = features.float(), mask.float()
        fg = pooled(features, mask)
        bg = pooled(features, 1.0 - mask)
        b = fg.shape[0]
        off_diagonal = ~torch.eye(b, dtype=torch.bool, device=fg.device)

        def similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return ((1.0 + x @ y.T) / 2.0).clamp(1e-4, 1.0 - 1e-4)

        negatives = -torch.log(1.0 - similarity(fg, bg)).mean()
        if b < 2:
            return negatives
        positives = -torch.log(similarity(fg, fg)[off_diagonal]).mean()
        positives = positives - torch.log(similarity(bg, bg)[off_diagonal]).mean()
        return positives + negatives


def foreground_loss(
    output: MCTOutput, targets: torch.Tensor, head: nn.Module, weights: Mapping[str, Any]
) -> torch.Tensor | None:
    """The weighted sum of the foreground levers, or None when every weight is zero.

    Parameters
    ----------
    output
        Model output of a model with a foreground head.
    targets
        (B, C) multi-hot training targets.
    head
        The model's CAM head (``model.head``).
    weights
        ``train.levers.foreground``: the weights of :data:`LEVER_WEIGHTS` and the size
        constraint's ``size_bounds``.
    """
    suppression, area, contrast, size, compact = (float(weights[k]) for k in LEVER_WEIGHTS)
    if suppression == area == contrast == size == compact == 0.0:
        return None
    if output.foreground is None or output.patch_features is None:
        raise ValueError(
            "train.levers.foreground needs a model with a foreground head "
            "(model.foreground_head=true)"
        )
    mask = torch.sigmoid(output.foreground)
    features = output.patch_features
    total = features.new_zeros(())
    if suppression:
        total = total + suppression * suppression_loss(head, features, mask, targets)
    if area:
        total = total + area * area_loss(mask)
    if contrast:
        total = total + contrast * contrast_loss(features, mask)
    # The shape levers speak of a cell; a cell-free crop (negatives) has none to shape.
    cells = mask[targets.sum(dim=1) > 0]
    if size and len(cells):
        total = total + size * size_loss(cells, weights["size_bounds"])
    if compact and len(cells):
        total = total + compact * compactness_loss(cells)
    return total
