"""The DeepLab segmenter trained on pseudo-masks, and its predict loop (docs/method.md section 4).

torchvision builders are called with ``weights=None, weights_backbone=None``: their default
backbone weights would be downloaded, which sites and tests cannot do. A local backbone file
can be given instead. BatchNorm in the ASPP pooling branch fails on a batch of one in training
mode (pytorch/vision #1667), so training insists on batches of at least two and drops the last
incomplete batch.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation

from common.augment import normalise
from common.checkpoint import load_checkpoint
from common.imaging import channel_argmax, resize_images, resize_labels
from common.metrics import IGNORE_INDEX
from common.progress import Progress

log = logging.getLogger(__name__)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3_resnet50": segmentation.deeplabv3_resnet50,
    "deeplabv3_mobilenet_v3_large": segmentation.deeplabv3_mobilenet_v3_large,
    "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large,
}
# Share of training images whose mask foreground may equal the ground truth pixel for pixel
# before training is refused: weak labels never reproduce an expert's mask exactly.
GROUND_TRUTH_SHARE_LIMIT = 0.5


class GroundTruthLeakError(ValueError):
    """Raised when the segmenter would be trained on ground-truth masks instead of pseudo-masks.

    Training on ground truth (MCTformer issue #31) inflates every reported number.
    """


def create_segmenter(cfg: Mapping[str, Any], num_outputs: int) -> nn.Module:
    """Build the configured torchvision segmenter, never downloading anything.

    Parameters
    ----------
    cfg
        The ``segmenter`` config node: ``arch`` (a key of :data:`ARCHITECTURES`) and optional
        ``backbone_weights_file`` (a local ImageNet classifier state dict for the backbone).
    num_outputs
        Background + C.

    Returns
    -------
    torch.nn.Module
        The model; its forward returns ``{"out": (B, K, H, W)}`` at input size.
    """
    arch = cfg["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"segmenter.arch={arch!r} is unknown; expected one of {sorted(ARCHITECTURES)}"
        )
    extra = {"aux_loss": False} if arch.startswith("deeplabv3") else {}
    model = ARCHITECTURES[arch](
        weights=None, weights_backbone=None, num_classes=num_outputs, **extra
    )
    if cfg.get("backbone_weights_file"):
        _load_backbone(model, Path(cfg["backbone_weights_file"]))
    return model


def _load_backbone(model: nn.Module, path: Path) -> None:
    """Load a classifier state dict (ResNet or MobileNetV3) into the segmenter's backbone."""
    if not path.is_file():
        raise FileNotFoundError(f"segmenter.backbone_weights_file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = model.backbone
    own = backbone.state_dict()
    renamed = {key.removeprefix("features."): value for key, value in state.items()}
    matched = {key: value for key, value in renamed.items() if key in own}
    missing = sorted(own.keys() - matched.keys())
    if missing:
        raise ValueError(f"{path} does not fit the segmenter backbone; missing {missing[:4]}")
    backbone.load_state_dict(matched)
    log.info("segmenter backbone initialised from %s (%d tensors)", path, len(matched))


def check_not_ground_truth(
    masks: Sequence[np.ndarray], ground_truth: Sequence[np.ndarray] | None
) -> None:
    """Refuse training masks whose foreground reproduces the ground truth.

    Parameters
    ----------
    masks
        Training label maps (0 background, k class, 255 ignore).
    ground_truth
        Ground-truth masks of the same images (codes {0, 1, 2}), or ``None`` if the hospital
        has none (nothing to compare against).

    Raises
    ------
    GroundTruthLeakError
        When more than half of the masks match the ground-truth cell area pixel for pixel.
    """
    if ground_truth is None or not masks:
        return
    if len(ground_truth) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(ground_truth)} ground-truth masks")
    identical = sum(
        mask.shape == truth.shape
        and np.array_equal((mask != 0) & (mask != IGNORE_INDEX), truth > 0)
        for mask, truth in zip(masks, ground_truth, strict=True)
    )
    if identical > GROUND_TRUTH_SHARE_LIMIT * len(masks):
        raise GroundTruthLeakError(
            f"{identical} of {len(masks)} training masks equal the ground truth pixel for pixel: "
            "the segmenter must learn from pseudo-masks, not from the evaluation masks"
        )


def _augment(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips and 90-degree turns of a batch, jointly: a cell on a slide has no up or left."""
    for dim in (-1, -2):
        if torch.rand((), generator=generator) < 0.5:
            images, labels = images.flip(dim), labels.flip(dim)
    turns = int(torch.randint(4, (), generator=generator))
    return images.rot90(turns, (-2, -1)), labels.rot90(turns, (-2, -1))


def _optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW (from-scratch CPU preset) or SGD with momentum (the reference's poly SGD).

    The reference passes weight decay positionally into SGD's momentum slot (docs/method.md
    §4); here both mean what they say.
    """
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
        )
    raise ValueError(f"segmenter.optimizer must be 'adamw' or 'sgd', got {cfg['optimizer']!r}")


def training_epochs(cfg: Mapping[str, Any], steps_per_epoch: int) -> int:
    """``epochs``, raised until the run makes at least ``min_steps`` optimizer steps.

    A hospital with 31 training images makes 3 steps per epoch at batch 8: a fixed epoch count
    leaves a from-scratch segmenter untrained at small hospitals and wastes time at large ones.
    """
    floor = math.ceil(int(cfg.get("min_steps", 0)) / max(1, steps_per_epoch))
    return max(int(cfg["epochs"]), floor)


def train_segmenter(
    model: nn.Module,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    cfg: Mapping[str, Any],
    *,
    device: torch.device,
    seed: int,
    ground_truth: Sequence[np.ndarray] | None = None,
) -> list[float]:
    """Train on pseudo-masks with cross-entropy (ignore 255) and a poly learning-rate decay.

    Parameters
    ----------
    model
        From :func:`create_segmenter`.
    images
        Native HxWx3 uint8 training images.
    masks
        Their pseudo-masks (HxW uint8, 0 background, k class, 255 ignore).
    cfg
        The ``segmenter`` config node (``input_size``, ``epochs``, ``min_steps``,
        ``batch_size``, optimizer).
    device
        Where to train.
    seed
        Fixes the order and the augmentations.
    ground_truth
        The same images' ground-truth masks when the hospital has them, for the guard.

    Returns
    -------
    list[float]
        Mean training loss of every epoch.

    Raises
    ------
    GroundTruthLeakError
        When ``masks`` reproduce ``ground_truth``.
    ValueError
        When the batch size or the number of images is below two.
    """
    check_not_ground_truth(masks, ground_truth)
    batch_size = int(cfg["batch_size"])
    if batch_size < 2:
        raise ValueError(f"segmenter.batch_size must be >= 2 for BatchNorm, got {batch_size}")
    if len(images) < 2:
        raise ValueError(f"the segmenter needs at least 2 training images, got {len(images)}")
    batch_size = min(batch_size, len(images))
    side = int(cfg["input_size"])
    inputs, targets = resize_images(images, side), resize_labels(masks, side)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = len(images) // batch_size  # drop_last: no batch of one reaches BatchNorm
    epochs = training_epochs(cfg, steps_per_epoch)
    total = epochs * steps_per_epoch
    progress = Progress("segmenter training steps", total, log)
    model.to(device).train()
    losses: list[float] = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        epoch_losses = []
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            index = order[first : first + batch_size]
            batch, labels = _augment(inputs[index], targets[index], generator)
            logits = model(normalise(batch).to(device))["out"]
            loss = F.cross_entropy(logits, labels.long().to(device), ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"segmenter loss became {loss.item()} at step {step}")
            for group in optimizer.param_groups:
                group["lr"] = cfg["lr"] * (1 - step / total) ** 0.9
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            epoch_losses.append(loss.item())
            progress.update(loss=loss.item())
        losses.append(float(np.mean(epoch_losses)) if epoch_losses else math.nan)
    recalibrate_batchnorm(model, inputs, batch_size, device)
    return losses


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> None:
    """Re-estimate BatchNorm running statistics with the final weights ("precise BN").

    MobileNetV3 keeps them with momentum 0.01, a ~70-step memory. Trained from scratch for a
    few hundred steps, the weights move faster than that, and the stale statistics made the
    eval-mode model predict background everywhere while train mode segmented well. One
    unaugmented pass over the training images with a cumulative average fixes them.

    Parameters
    ----------
    model
        The trained segmenter; left in eval mode.
    images
        (N, 3, S, S) uint8 training images at the input size.
    batch_size
        Images per pass (>= 2; the last incomplete batch is dropped like in training).
    device
        Where the model is.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average over all batches of this pass
    model.train()
    for first in range(0, len(images) - batch_size + 1, batch_size):
        model(normalise(images[first : first + batch_size]).to(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


@torch.no_grad()
def native_logits(
    model: nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    *,
    device: torch.device,
    batch_size: int = 16,
) -> Iterator[torch.Tensor]:
    """Class logits of every image at its own size: resize to ``input_size``, upsample back.

    Yields one (K, H, W) tensor per image, in order, so a large folder never holds them all.

    Parameters
    ----------
    model
        A trained segmenter.
    images
        Native HxWx3 uint8 images.
    input_size
        Side the segmenter was trained at.
    device
        Where to run.
    batch_size
        Images per forward pass.
    """
    model.to(device).eval()
    progress = Progress("segmenter predictions", len(images), log)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        logits = model(normalise(resize_images(chunk, input_size)).to(device))["out"]
        by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, image in enumerate(chunk):
            by_size[(image.shape[0], image.shape[1])].append(index)
        native: list[torch.Tensor] = [torch.empty(0)] * len(chunk)
        for size, indices in by_size.items():
            upsampled = F.interpolate(
                logits[indices], size=size, mode="bilinear", align_corners=False
            )
            for index, scores in zip(indices, upsampled, strict=True):
                native[index] = scores.cpu()
        yield from native
        progress.update(len(chunk))


def predict(
    model: nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    *,
    device: torch.device,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """One HxW uint8 label map per image (0 background, k = class k - 1).

    The argmax of :func:`native_logits`, which documents the arguments.
    """
    return [
        channel_argmax(scores).to(torch.uint8).numpy()
        for scores in native_logits(model, images, input_size, device=device, batch_size=batch_size)
    ]


def segmenter_payload(
    model: nn.Module, cfg: Mapping[str, Any], classes: Sequence[str]
) -> dict[str, Any]:
    """Everything :func:`load_segmenter` needs, as tensors and plain values (no pickled objects)."""
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "segmenter": {
            "arch": cfg["arch"],
            "input_size": int(cfg["input_size"]),
            "backbone_weights_file": None,
        },
        "classes": list(classes),
    }


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """Rebuild a segmenter saved with :func:`segmenter_payload`.

    Returns
    -------
    tuple
        The model (CPU, eval mode), its ``segmenter`` config and the class names.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a segmenter checkpoint.
    """
    payload = load_checkpoint(path)
    if not {"state_dict", "segmenter", "classes"} <= payload.keys():
        raise ValueError(f"{path} is not a segmenter checkpoint (written by w3s-postprocess)")
    cfg, classes = payload["segmenter"], list(payload["classes"])
    model = create_segmenter(cfg, len(classes) + 1)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), cfg, classes
