"""Training and evaluation transforms on cached uint8 tensors (docs/method.md section 2)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Cached training images are stored this much larger than the model input, mirroring the
# reference "resize 256, crop 224" so that random crops keep full resolution.
TRAIN_RESIZE_RATIO = 256 / 224


def train_cache_size(img_size: int) -> int:
    """Side of the cached training tensors for a model input of ``img_size``."""
    return round(img_size * TRAIN_RESIZE_RATIO)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, ImageNet-normalised (the DeiT statistics)."""
    mean = images.new_tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = images.new_tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return (images.float() / 255.0 - mean) / std


# RandAugment's magnitude on the reference's scale: timm (``rand-m9``, which DeiT and MCT use)
# reads it in tenths of each operation's maximum, so 9 is 0.9 of it. torchvision's default 31
# bins would make 9 a weak 0.3 (9 degrees of rotation instead of 27).
RANDAUGMENT_LEVELS = 10


def magnitude_problem(augment: Mapping[str, Any]) -> str | None:
    """Why a ``train.augment`` node's RandAugment magnitude cannot be used, or None.

    Only where RandAugment is on (``randaugment_ops`` > 0). Model files trained before the
    magnitude was read on timm's scale may hold values up to 30 (torchvision's levels).
    """
    magnitude = augment["randaugment_magnitude"]
    try:
        whole = float(magnitude).is_integer() and 0 <= float(magnitude) <= RANDAUGMENT_LEVELS
    except (TypeError, ValueError):
        whole = False
    if whole or not float(augment["randaugment_ops"]) > 0:
        return None
    return (
        f"train.augment.randaugment_magnitude={magnitude}: expected a whole number in "
        f"0..{RANDAUGMENT_LEVELS} (tenths of each operation's maximum, as timm's rand-m9)"
    )


def rand_augment(augment: Mapping[str, Any]) -> v2.RandAugment:
    """A ``train.augment`` node's RandAugment, its magnitude out of :data:`RANDAUGMENT_LEVELS`."""
    if problem := magnitude_problem(augment):
        raise ValueError(problem)
    return v2.RandAugment(
        num_ops=int(augment["randaugment_ops"]),
        magnitude=int(augment["randaugment_magnitude"]),
        num_magnitude_bins=RANDAUGMENT_LEVELS + 1,
    )


def build_train_transform(
    augment: Mapping[str, Any], img_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image random crop, flips, RandAugment and erasing on a uint8 (3, H, W) tensor.

    Vertical flips are on by default (unlike ImageNet recipes): a cell on a slide has no up.
    """
    steps: list[Any] = [
        v2.RandomResizedCrop(img_size, scale=tuple(augment["crop_scale"]), antialias=True)
    ]
    if augment["hflip"]:
        steps.append(v2.RandomHorizontalFlip())
    if augment["vflip"]:
        steps.append(v2.RandomVerticalFlip())
    if any(augment["color_jitter"]):
        brightness, contrast, saturation, hue = augment["color_jitter"]
        steps.append(v2.ColorJitter(brightness, contrast, saturation, hue))
    if augment["grayscale_p"] > 0:
        steps.append(v2.RandomGrayscale(p=augment["grayscale_p"]))
    if augment["randaugment_ops"] > 0:
        steps.append(rand_augment(augment))
    pixel = v2.Compose(steps)
    # Per-pixel normal noise in the normalised image, as timm's erasing (mode "pixel").
    erase = (
        v2.RandomErasing(p=augment["erasing_p"], value="random")
        if augment["erasing_p"] > 0
        else None
    )

    def transform(image: torch.Tensor) -> torch.Tensor:
        out = normalise(pixel(image)[None])[0]
        return erase(out) if erase is not None else out

    return transform
