"""A hospital's split as fixed-size tensors, the form training and evaluation consume."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import functional as tvf

from common.data.readers import hospital_key, load_hospital
from common.data.splits import SPLITS, SplitSpec
from common.data.types import HospitalData, id_bytes

log = logging.getLogger(__name__)


@dataclass
class SplitTensors:
    """One split of one hospital, resized to a square side ``S``.

    Attributes
    ----------
    images
        ``(N, 3, S, S)`` uint8 RGB, antialiased bilinear resize (aspect ratio not kept; crops are
        near-square single cells).
    labels
        ``(N,)`` int64 indices into the vocabulary.
    masks
        ``(N, S, S)`` uint8 codes {0, 1, 2}, nearest-neighbour resize so no code is invented at
        edges; ``None`` when the hospital has no masks.
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


_TENSOR_CACHE: dict[tuple[str, SplitSpec, str, int], SplitTensors] = {}


def hospital_split(data_cfg: Any, name: str, split: str) -> HospitalData:
    """Return one split of a hospital's verified, cached data.

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node; its ``split`` fixes the split (:class:`SplitSpec`).
    name
        Hospital key in ``data_cfg.hospitals``.
    split
        ``"train"``, ``"val"`` or ``"test"``.

    Returns
    -------
    HospitalData
        The split's images, sharing the cached hospital's read-only arrays.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    data = load_hospital(data_cfg, name)
    return data.subset(SplitSpec.of(data_cfg).indices(data.labels)[split])


def split_digest(data_cfg: Any, name: str) -> int:
    """A 48-bit fingerprint of which image (id and label) lies in which split at this hospital.

    Splits are drawn over the images in listing order, so an image added, removed or renamed
    after training redraws them, and post-training could then score the model on images it
    trained on. Each hospital sends this number with its training replies; the model files of
    a run without differential privacy keep it, and post-training refuses a split whose
    fingerprint differs. It names no file: a truncated hash of every id of the hospital together.
    """
    data = load_hospital(data_cfg, name)
    parts = SplitSpec.of(data_cfg).indices(data.labels)
    digest = hashlib.sha256()
    for split in SPLITS:
        for index in parts[split]:
            digest.update(id_bytes(f"{split}\t{data.labels[index]}\t{data.sample_ids[index]}\n"))
    return int.from_bytes(digest.digest()[:6], "big")


def split_tensors(data_cfg: Any, name: str, split: str, size: int) -> SplitTensors:
    """Return a hospital's split as resized tensors, built once per process.

    The result is shared by every caller asking for the same hospital config, split settings and
    size, so treat its tensors as read-only (``.float()`` and friends copy).

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node.
    name
        Hospital key in ``data_cfg.hospitals``.
    split
        ``"train"``, ``"val"`` or ``"test"``.
    size
        Side of the square output images in pixels.

    Returns
    -------
    SplitTensors
        Images, labels and (when the hospital has them) masks.

    Raises
    ------
    DataVerificationError
        When the hospital's data fails verification.
    """
    key = (hospital_key(data_cfg, name), SplitSpec.of(data_cfg), split, int(size))
    if key not in _TENSOR_CACHE:
        tensors = _to_tensors(hospital_split(data_cfg, name, split), int(size))
        log.info("hospital %s: %s split, %d images at %d px", name, split, len(tensors), size)
        _TENSOR_CACHE[key] = tensors
    return _TENSOR_CACHE[key]


def _to_tensors(data: HospitalData, size: int) -> SplitTensors:
    """Resize every image (and mask) to ``size`` x ``size``, batching images of equal shape."""
    count = len(data)
    images = torch.empty((count, 3, size, size), dtype=torch.uint8)
    masks = None if data.masks is None else torch.empty((count, size, size), dtype=torch.uint8)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, image in enumerate(data.images):
        by_shape[image.shape].append(index)
    for indices in by_shape.values():
        batch = torch.from_numpy(np.stack([data.images[i] for i in indices])).permute(0, 3, 1, 2)
        images[indices] = tvf.resize(batch, [size, size], antialias=True)
        if masks is not None and data.masks is not None:
            codes = torch.from_numpy(np.stack([data.masks[i] for i in indices]))[:, None]
            nearest = tvf.InterpolationMode.NEAREST_EXACT
            masks[indices] = tvf.resize(codes, [size, size], interpolation=nearest)[:, 0]
    return SplitTensors(images, torch.from_numpy(data.labels.copy()), masks)
