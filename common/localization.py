"""Class localization maps of the MCT model: class attention x patch-CAM (docs/method.md §1).

The reference generates, per image and present class: the class-to-patch attention summed over
the last K layers, times ReLU(patch-CAM); one matrix product with the patch-to-patch attention
summed over all layers; bilinear upsampling to image size; the sum over scales x {image, hflip};
masking by the image's labels; min-max per class. Where the FL-W3S text and the code disagree
(min-max of the factors before the product, mean instead of sum over layers), both are options
of :class:`MapSettings`; the defaults are the code's.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from common.augment import normalise
from common.imaging import resize_images
from common.model import MCTFormerV2, MCTOutput
from common.progress import Progress

log = logging.getLogger(__name__)

MapSource = Literal["fused", "class_attention", "patch_cam", "foreground", "fused_foreground"]
# The sources that need the model's foreground head (model.foreground_head).
FOREGROUND_SOURCES = ("foreground", "fused_foreground")
LayerReduce = Literal["sum", "mean"]


def _reduce_layers(layers: Sequence[torch.Tensor], reduce: LayerReduce) -> torch.Tensor:
    """Sum or mean of per-layer tensors, added in place (no (L, B, T, T) stack in memory)."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    total = layers[0].clone()
    for layer in layers[1:]:
        total += layer
    return total / len(layers) if reduce == "mean" else total


def _minmax_per_map(maps: torch.Tensor) -> torch.Tensor:
    """Min-max every (image, class) map over its last two dims into [0, 1]."""
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low + 1e-8)


def fused_maps(
    output: MCTOutput,
    last_k_layers: int,
    *,
    source: MapSource = "fused",
    reduce: LayerReduce = "sum",
    minmax_factors: bool = False,
    flip: bool | None = None,
) -> torch.Tensor:
    """Class-to-patch attention over the last K layers times ReLU(patch-CAM), (B, C, h, w).

    Parameters
    ----------
    output
        Model output of ``forward(..., return_attention=True)``.
    last_k_layers
        K; the reference generates with 3.
    source
        ``"fused"`` (the product), ``"class_attention"`` or ``"patch_cam"`` alone, as the
        reference's ``--attention-type`` allows; single factors show which one localizes.
        ``"foreground"``: the class-agnostic foreground head's probabilities, oriented per
        image by :func:`oriented_foreground` (label masking picks the image's class);
        ``"fused_foreground"``: the fused map times them. Both need ``foreground_head``.
    reduce
        ``"sum"`` over layers (reference code; the later min-max removes the scale) or
        ``"mean"`` (MCTformer+).
    minmax_factors
        Min-max each factor per image and class before the product, as the FL-W3S text
        describes; the reference code multiplies the raw factors.
    flip
        The foreground head's orientation for every image of a split, decided once by
        :func:`foreground_flip`; None: by this batch (:func:`oriented_foreground`).

    Returns
    -------
    torch.Tensor
        Raw maps on the patch grid, not yet upsampled, masked or normalised.
    """
    if output.attentions is None:
        raise ValueError("fused_maps needs the model output of forward(..., return_attention=True)")
    if not 1 <= last_k_layers <= len(output.attentions):
        raise ValueError(f"last_k_layers={last_k_layers} outside 1..{len(output.attentions)}")
    b, c, h, w = output.patch_cam.shape
    attention = _reduce_layers(output.attentions[-last_k_layers:], reduce)
    class_attention = attention[:, :c, c:].reshape(b, c, h, w)
    patch_cam = F.relu(output.patch_cam)
    if source == "class_attention":
        return class_attention
    if source == "patch_cam":
        return patch_cam
    if source not in get_args(MapSource):
        raise ValueError(f"source must be one of {get_args(MapSource)}, got {source!r}")
    if minmax_factors:
        class_attention, patch_cam = _minmax_per_map(class_attention), _minmax_per_map(patch_cam)
    fused = class_attention * patch_cam
    if source == "fused":
        return fused
    if output.foreground is None:
        raise ValueError(f"localization.source={source} needs model.foreground_head=true")
    foreground = oriented_foreground(torch.sigmoid(output.foreground), flip).expand_as(fused)
    return foreground if source == "foreground" else fused * foreground


def oriented_foreground(mask: torch.Tensor, flip: bool | None = None) -> torch.Tensor:
    """M or 1 - M for the whole batch: the side that covers less than half of a typical image.

    The foreground head's contrastive split has no sign: it can, and from the first round did,
    call the background foreground (docs/localization.md). A single white cell covers less of
    its crop than the plasma and red cells around it (23-32 % on average in the real
    hospitals, at most 52 %), so the smaller side is the cell. That is a prior on the cell's
    size, not on where it is. The sign belongs to the head, not to an image, so the batch's
    median area decides it for every image of the batch: deciding per image flipped the
    images whose cell side had grown past half (Dataset 2 with the area term, measured).
    Orienting by the class maps (the side on which the fused map is denser) failed too:
    those maps are too weak to decide.

    Parameters
    ----------
    mask
        (B, 1, h, w) foreground probabilities of the head.
    flip
        Whether to take 1 - M, decided beforehand over more images than this batch
        (:func:`foreground_flip`); None decides by this batch.

    Returns
    -------
    torch.Tensor
        (B, 1, h, w) oriented foreground probabilities.
    """
    if flip is None:
        flip = larger_side_is_cell(mask.mean(dim=(1, 2, 3)))
    return 1 - mask if flip else mask


def larger_side_is_cell(areas: torch.Tensor) -> bool:
    """Whether the median of the head's per-image areas is past half: then 1 - M is the cell.

    The mean of the two middle areas for an even count: torch's ``median`` takes the lower,
    which with the middle pair either side of 0.5 called neither M nor 1 - M flipped.
    """
    return bool(areas.float().quantile(0.5) > 0.5)


@torch.no_grad()
def foreground_flip(model: MCTFormerV2, batches: Iterable[torch.Tensor]) -> bool:
    """The foreground head's orientation for a whole split, decided once from all its images.

    The maps of a split are made in chunks of a batch size; deciding per chunk, as a training
    batch does, made an image's map depend on which images shared its chunk, and a last chunk
    of one or two images decided alone, the other way round (inverted maps, reproduced).
    """
    areas = [
        torch.sigmoid(model(batch).foreground.float()).mean(dim=(1, 2, 3)).cpu()
        for batch in batches
    ]
    return larger_side_is_cell(torch.cat(areas))


def patch_affinity(
    attentions: Sequence[torch.Tensor], num_classes: int, reduce: LayerReduce = "sum"
) -> torch.Tensor:
    """Patch-to-patch attention over all layers, P (B, N, N): raw softmax rows, not symmetrised.

    Parameters
    ----------
    attentions
        Per-layer head-mean attention (B, T, T), class tokens first.
    num_classes
        C, the number of class tokens to drop.
    reduce
        ``"sum"`` (reference) or ``"mean"`` over the layers.

    Returns
    -------
    torch.Tensor
        P[b, p, q]: how much patch p attends to patch q.
    """
    return _reduce_layers(attentions, reduce)[:, num_classes:, num_classes:]


def refine_maps(maps: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
    """Propagate maps along the patch affinity: refined[c, p] = sum_q P[p, q] maps[c, q].

    One matrix product, exactly the reference's ``--patch-attn-refine`` and the FL-W3S formula.

    Parameters
    ----------
    maps
        (B, C, h, w) on the patch grid.
    affinity
        (B, N, N) with N = h*w, from :func:`patch_affinity`.

    Returns
    -------
    torch.Tensor
        (B, C, h, w) refined maps.
    """
    b, c, h, w = maps.shape
    if affinity.shape != (b, h * w, h * w):
        raise ValueError(f"affinity {tuple(affinity.shape)} does not fit maps {tuple(maps.shape)}")
    return (maps.flatten(2) @ affinity.transpose(1, 2)).reshape(b, c, h, w)


def upsample_masked(maps: torch.Tensor, size: Sequence[int], present: torch.Tensor) -> torch.Tensor:
    """Bilinearly upsample (B, C, h, w) maps to ``size`` and zero the classes not present."""
    maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps * present[:, :, None, None].to(maps.dtype)


def minmax_present(maps: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Min-max each present class into [0, 1] as (x - min) / (max - min + 1e-8); absent stay 0."""
    return _minmax_per_map(maps) * present[:, :, None, None].to(maps.dtype)


def normalise_maps(
    maps: torch.Tensor, size: tuple[int, int], present: torch.Tensor
) -> torch.Tensor:
    """Upsample to image size, zero absent classes, min-max each present class into [0, 1]."""
    return minmax_present(upsample_masked(maps, size, present), present)


@dataclass(frozen=True)
class MapSettings:
    """How maps are generated; the defaults reproduce the reference code (docs/method.md section 1).

    Attributes
    ----------
    last_k_layers, source, reduce, minmax_factors
        See :func:`fused_maps`; ``reduce`` also applies to the refinement's layer sum.
    refine
        Apply :func:`refine_maps` with the all-layer patch affinity.
    scales
        Input scales relative to ``input_size``; each runs on the image and its flips (if
        ``hflip`` or ``vflip``), and the upsampled maps are summed.
    hflip
        Add the horizontally flipped pass of every scale (flipped back before the sum).
    vflip
        Add the vertically flipped pass of every pass above (with ``hflip``, four in all):
        training flips both ways, since a cell on a slide has no up.
    input_size
        Side the images are resized to before the scales apply; ``None`` is the model's
        training size. The reference runs at full resolution; a model trained on resized crops
        sees cells at the scale it learnt only at its training size.
    """

    last_k_layers: int = 3
    source: MapSource = "fused"
    reduce: LayerReduce = "sum"
    minmax_factors: bool = False
    refine: bool = True
    scales: tuple[float, ...] = (1.0,)
    hflip: bool = True
    vflip: bool = False
    input_size: int | None = None

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"localization.scales must be positive and non-empty: {self.scales}")
        layers = self.last_k_layers
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise ValueError(f"localization.last_k_layers={layers}: expected a whole number >= 1")
        size = self.input_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(
                f"localization.input_size={size}: expected null or a whole number >= 1"
            )
        for key in ("minmax_factors", "refine", "hflip", "vflip"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"localization.{key}={getattr(self, key)}: expected true or false")
        for key, allowed in (("source", MapSource), ("reduce", LayerReduce)):
            value = getattr(self, key)
            if value not in get_args(allowed):
                raise ValueError(
                    f"localization.{key}={value!r}: expected one of {get_args(allowed)}"
                )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MapSettings:
        """Build from the ``localization`` config node (its ``thresholds`` serve validation)."""
        values = {key: value for key, value in cfg.items() if key != "thresholds"}
        if unknown := sorted(set(values) - {field.name for field in fields(cls)}):
            raise ValueError(f"localization.{unknown[0]}: no such setting")
        scales = values.get("scales", cls.scales)
        try:
            values["scales"] = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise ValueError(f"localization.scales={scales}: expected a list of numbers") from None
        return cls(**values)

    def flips(self) -> list[tuple[int, ...]]:
        """The dims each pass of a scale flips, the image as given first."""
        passes: list[tuple[int, ...]] = [()]
        if self.hflip:
            passes.append((-1,))
        if self.vflip:
            passes += [(*dims, -2) for dims in passes]
        return passes

    def side(self, model: MCTFormerV2, scale: float) -> int:
        """Input side for ``scale``, rounded to a multiple of the patch size (at least one)."""
        base = self.input_size or model.img_size
        return max(round(base * scale / model.patch_size), 1) * model.patch_size


@dataclass
class MapBatch:
    """Maps of one batch of images.

    Attributes
    ----------
    maps
        One (C, H, W) float32 tensor per image at its own size, in [0, 1], zero for classes
        the image does not have.
    affinity
        (B, N, N) patch affinity P of the first scale's unflipped pass; the transformer's own
        affinity for the ``attn_rw`` pseudo-masks.
    grid
        (h, w) patch grid that ``affinity`` lives on.
    """

    maps: list[torch.Tensor]
    affinity: torch.Tensor
    grid: tuple[int, int]


@torch.no_grad()
def batch_maps(
    model: MCTFormerV2,
    images: torch.Tensor,
    present: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    settings: MapSettings,
    flip: bool | None = None,
) -> MapBatch:
    """Generate the maps of a batch, vectorised over images, scales and flips.

    Parameters
    ----------
    model
        The trained model, in eval mode, on the device of ``images``.
    images
        (B, 3, S, S) ImageNet-normalised float images at ``settings.side(model, 1.0)``.
    present
        (B, C) 0/1 image labels; the maps of other classes are zeroed (reference step 2).
    sizes
        Native (H, W) of each image, the size its maps are returned at.
    settings
        Generation options.
    flip
        The foreground head's orientation over the split (:func:`fused_maps`).

    Returns
    -------
    MapBatch
        Per-image maps and the first pass's patch affinity.
    """
    per_scale: list[torch.Tensor] = []
    affinities: list[torch.Tensor] = []
    flips = settings.flips()
    for scale in settings.scales:
        side = settings.side(model, scale)
        scaled = images
        if tuple(images.shape[-2:]) != (side, side):
            scaled = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        batch = torch.cat([scaled.flip(dims) if dims else scaled for dims in flips])
        output = model(batch, return_attention=True)
        maps = fused_maps(
            output,
            settings.last_k_layers,
            source=settings.source,
            reduce=settings.reduce,
            minmax_factors=settings.minmax_factors,
            flip=flip,
        )
        affinity = patch_affinity(output.attentions or [], model.num_classes, settings.reduce)
        if settings.refine:
            maps = refine_maps(maps, affinity)
        views = maps.chunk(len(flips))
        maps = torch.stack(
            [view.flip(dims) if dims else view for view, dims in zip(views, flips, strict=True)]
        ).sum(0)
        per_scale.append(maps)
        affinities.append(affinity[: len(images)])
    grid = (per_scale[0].shape[-2], per_scale[0].shape[-1])
    return MapBatch(_to_image_size(per_scale, present, sizes), affinities[0].float().cpu(), grid)


def _to_image_size(
    per_scale: Sequence[torch.Tensor], present: torch.Tensor, sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Upsample, sum over scales and min-max only the present (image, class) maps.

    Equal to the reference's upsample-mask-sum-min-max of every pass: bilinear upsampling is
    linear, so a scale's two flip passes are summed on their grid first, and absent classes
    are zero either way. Skipping them saves most of the work on single-label images.
    """
    num_classes = per_scale[0].shape[1]
    out = [torch.zeros((num_classes, *size)) for size in sizes]
    pairs_by_size: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for image, cls in torch.nonzero(present).tolist():
        pairs_by_size[tuple(sizes[image])].append((image, cls))
    for size, pairs in pairs_by_size.items():
        rows = torch.tensor([image for image, _ in pairs], device=per_scale[0].device)
        cols = torch.tensor([cls for _, cls in pairs], device=per_scale[0].device)
        summed = sum(
            F.interpolate(
                maps[rows, cols][:, None], size=size, mode="bilinear", align_corners=False
            )
            for maps in per_scale
        )
        for (image, cls), values in zip(
            pairs, _minmax_per_map(summed[:, 0]).float().cpu(), strict=True
        ):
            out[image][cls] = values
    return out


def _image_batches(
    images: Sequence[np.ndarray], side: int, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield normalise(resize_images(images[start : start + batch_size], side)).to(device)


def maps_orientation(
    model: MCTFormerV2,
    images: Sequence[np.ndarray],
    settings: MapSettings,
    *,
    device: torch.device,
    batch_size: int = 32,
) -> bool | None:
    """The foreground head's orientation for a model's maps, decided once on ``images``.

    Decided on the training split and passed to every split's :func:`generate_maps`: each
    split deciding alone turned the test maps inside out against the validation maps that
    chose every threshold (reproduced with a split whose typical head area lay past half),
    let a one-image split decide alone, and let the test images set a choice. None where the
    maps do not come from the head.
    """
    if settings.source not in FOREGROUND_SOURCES:
        return None
    model.to(device).eval()
    side = settings.side(model, 1.0)
    return foreground_flip(model, _image_batches(images, side, batch_size, device))


def generate_maps(
    model: MCTFormerV2,
    images: Sequence[np.ndarray],
    labels: Sequence[int] | np.ndarray,
    settings: MapSettings,
    *,
    device: torch.device,
    batch_size: int = 32,
    flip: bool | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[int, int]]:
    """Maps of every image of a split, in batches, with a progress log.

    Parameters
    ----------
    model
        The trained model.
    images
        Native HxWx3 uint8 images of any sizes.
    labels
        One class index per image (the weak label every image has).
    settings
        Generation options.
    device
        Where the model runs.
    batch_size
        Images per forward pass (times the flip passes and the number of scales).
    flip
        The foreground head's orientation, from :func:`maps_orientation` on the training
        split, so that every split of a model is oriented alike; None decides on ``images``.

    Returns
    -------
    tuple
        Per-image (C, H, W) maps, per-image (N, N) patch affinities, and the patch grid.
    """
    if flip is None:
        flip = maps_orientation(model, images, settings, device=device, batch_size=batch_size)
    model.to(device).eval()
    side = settings.side(model, 1.0)
    all_maps: list[torch.Tensor] = []
    affinities: list[torch.Tensor] = []
    grid = (0, 0)
    progress = Progress("maps", len(images), log)
    batches = _image_batches(images, side, batch_size, device)
    for start, batch in zip(range(0, len(images), batch_size), batches, strict=True):
        chunk = images[start : start + batch_size]
        classes = torch.as_tensor(np.asarray(labels[start : start + batch_size]), dtype=torch.long)
        present = F.one_hot(classes, model.num_classes).float()
        sizes = [(image.shape[0], image.shape[1]) for image in chunk]
        result = batch_maps(model, batch, present, sizes, settings, flip)
        all_maps += result.maps
        affinities += list(result.affinity)
        grid = result.grid
        progress.update(len(chunk))
    return all_maps, affinities, grid


def save_maps(path: Path, maps: torch.Tensor) -> None:
    """Write one image's maps as a compressed ``.npz`` (no pickles, loadable anywhere).

    Only present (non-zero) classes are stored, like the reference's ``{class: map}`` dict:
    ``classes`` (K,) int64 class indices and ``maps`` (K, H, W) float32.
    """
    keep = torch.nonzero(maps.flatten(1).amax(1) > 0).flatten()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        classes=keep.numpy().astype(np.int64),
        maps=maps[keep].numpy().astype(np.float32),
        shape=np.asarray(maps.shape, dtype=np.int64),
    )


def load_maps(path: Path) -> torch.Tensor:
    """Read a file of :func:`save_maps` back into the full (C, H, W) float32 tensor."""
    with np.load(path, allow_pickle=False) as data:
        full = np.zeros(tuple(data["shape"]), dtype=np.float32)
        full[data["classes"]] = data["maps"]
    return torch.from_numpy(full)
