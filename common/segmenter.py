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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import segmentation

from common.augment import normalise
from common.checkpoint import SEGMENTER_FILE, CheckpointError, load_weights, read_payload
from common.imaging import channel_argmax, resize_images, resize_labels
from common.metrics import IGNORE_INDEX
from common.progress import Progress
from common.training import training_epochs

log = logging.getLogger(__name__)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "deeplabv3_resnet50": segmentation.deeplabv3_resnet50,
    "deeplabv3_mobilenet_v3_large": segmentation.deeplabv3_mobilenet_v3_large,
    "lraspp_mobilenet_v3_large": segmentation.lraspp_mobilenet_v3_large,
}
# The segmenter's optimizers and learning-rate schedules; the first of each is the default.
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("poly", "one_cycle")
# Share of training images whose mask foreground may equal the ground truth pixel for pixel
# before training is refused: weak labels never reproduce an expert's mask exactly.
GROUND_TRUTH_SHARE_LIMIT = 0.5


class GroundTruthLeakError(ValueError):
    """Raised when the segmenter would be trained on ground-truth masks instead of pseudo-masks.

    Training on ground truth (MCTformer issue #31) inflates every reported number.
    """


def ensemble_members(cfg: Mapping[str, Any]) -> int:
    """How many segmenters a ``segmenter`` config (or a saved segmenter's) trains and averages.

    Configs and segmenter files written before the option existed hold one.
    """
    members = cfg.get("members", 1)
    whole = isinstance(members, int | float) and not isinstance(members, bool)
    whole = whole and math.isfinite(members)
    if not whole or members != int(members) or members < 1:
        raise ValueError(f"segmenter.members={members}: expected a whole number >= 1")
    return int(members)


# The side images are resized to for the segmenter; beyond these a value is a typo (or a
# crafted file asking for memory), not a setting.
INPUT_SIZES = (16, 4096)


def checked_input_size(cfg: Mapping[str, Any]) -> int:
    """The ``input_size`` of a ``segmenter`` config (or a saved segmenter's), checked."""
    value = cfg.get("input_size")
    low, high = INPUT_SIZES
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"segmenter.input_size={value}: expected a whole number in {low}..{high}")
    return value


def stored_members(state_dict: Any) -> int:
    """How many ensemble members a saved segmenter's weights hold (``members.<i>.`` keys)."""
    keys = state_dict.keys() if isinstance(state_dict, Mapping) else ()
    members = {key.split(".")[1] for key in keys if str(key).startswith("members.")}
    return len(members) or 1


class SegmenterEnsemble(nn.Module):
    """Segmenters trained alike from different seeds; predicts their mean class probabilities.

    On a hospital of a few dozen pseudo-masks one training draw can land points below the
    others (Dataset 1, one fold: 80.3 binary mIoU against 90.1 and 89.2 for two other seeds);
    the mean of a few draws does not depend on that luck. Its ``out`` is the log of the mean
    probabilities: the decoders take logits, and ``log_softmax`` of it is itself.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"out": (B, K, H, W)}``, as each member's forward returns."""
        mean = torch.stack([m(x)["out"].float().softmax(1) for m in self.members]).mean(0)
        return {"out": mean.clamp_min(torch.finfo(torch.float32).tiny).log()}


def create_segmenter(
    cfg: Mapping[str, Any], num_outputs: int, seed: int | None = None
) -> nn.Module:
    """Build the configured torchvision segmenter, never downloading anything.

    Parameters
    ----------
    cfg
        The ``segmenter`` config node: ``arch`` (a key of :data:`ARCHITECTURES`), optional
        ``backbone_weights_file`` (a local ImageNet classifier state dict for the backbone)
        and optional ``members`` (above 1: a :class:`SegmenterEnsemble` of that many).
    num_outputs
        Background + C.
    seed
        Seeds the initial weights, so that a trained segmenter does not depend on how many
        random numbers the job drew before it (a longer site fine-tune, say); ``None`` leaves
        the global generator as it is (weights that are loaded next). Member i of an
        ensemble starts from ``seed + i``.

    Returns
    -------
    torch.nn.Module
        The model; its forward returns ``{"out": (B, K, H, W)}`` at input size.
    """
    members = ensemble_members(cfg)
    if members > 1:
        return SegmenterEnsemble(
            [
                create_segmenter(
                    {**cfg, "members": 1}, num_outputs, None if seed is None else seed + i
                )
                for i in range(members)
            ]
        )
    arch = cfg["arch"]
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"segmenter.arch={arch!r} is unknown; expected one of {sorted(ARCHITECTURES)}"
        )
    extra = {"aux_loss": False} if arch.startswith("deeplabv3") else {}
    if seed is not None:
        torch.manual_seed(seed)
    model = ARCHITECTURES[arch](
        weights=None, weights_backbone=None, num_classes=num_outputs, **extra
    )
    if cfg.get("backbone_weights_file"):
        _load_backbone(model, Path(cfg["backbone_weights_file"]).expanduser())
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
        When more than half of the masks whose truth holds a cell match it pixel for pixel.
        A truth without a cell has nothing to leak: an empty pseudo-mask equals it honestly.
    """
    if ground_truth is None or not masks:
        return
    if len(ground_truth) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(ground_truth)} ground-truth masks")
    pairs = [(m, t) for m, t in zip(masks, ground_truth, strict=True) if t.any()]
    identical = sum(
        mask.shape == truth.shape
        and np.array_equal((mask != 0) & (mask != IGNORE_INDEX), truth > 0)
        for mask, truth in pairs
    )
    if pairs and identical > GROUND_TRUTH_SHARE_LIMIT * len(pairs):
        raise GroundTruthLeakError(
            f"{identical} of {len(pairs)} training masks equal the ground truth pixel for pixel: "
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


def check_segmenter_settings(cfg: Mapping[str, Any]) -> None:
    """Refuse settings the segmenter's training would fail on, naming the key and value.

    The segmenter trains after the maps, the fine-tune and the pseudo-masks: a wrong value
    found there, as a traceback, cost every stage before it.

    Raises
    ------
    ValueError
        ``segmenter.<key>=<value>: ...``.
    """
    ensemble_members(cfg)
    checked_input_size(cfg)
    if cfg["arch"] not in ARCHITECTURES:
        raise ValueError(
            f"segmenter.arch={cfg['arch']}: expected one of {', '.join(sorted(ARCHITECTURES))}"
        )
    for key, known in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
        if cfg.get(key, known[0]) not in known:
            raise ValueError(f"segmenter.{key}={cfg[key]}: expected one of {', '.join(known)}")
    batch = cfg["batch_size"]
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise ValueError(
            f"segmenter.batch_size={batch}: expected a whole number >= 2 (batch normalisation "
            "needs two images a step)"
        )
    for key in ("epochs", "min_steps"):
        value = cfg.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"segmenter.{key}={value}: expected a whole number >= 0")
    for key, valid, expected in (
        ("lr", lambda v: v > 0, "a number > 0"),
        ("warmup", lambda v: 0 <= v < 1, "a share in [0, 1)"),
        ("momentum", lambda v: 0 <= v < 1, "a number in [0, 1)"),
        ("weight_decay", lambda v: v >= 0, "a number >= 0"),
    ):
        value = cfg.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
            raise ValueError(f"segmenter.{key}={value}: expected {expected}")
    weights = cfg.get("backbone_weights_file")
    if weights is not None and not Path(str(weights)).expanduser().is_file():
        raise ValueError(f"segmenter.backbone_weights_file={weights}: no such file")


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


def learning_rate_schedule(cfg: Mapping[str, Any], total: int) -> Callable[[int], float]:
    """The learning rate of each optimizer step: ``poly`` decay or a ``one_cycle`` warm-up.

    ``poly`` is the reference's ``lr * (1 - step / total) ** 0.9``. ``one_cycle`` rises linearly
    from ``lr / 25`` to ``lr`` over the first ``warmup`` share of the steps and falls back along a
    cosine: a from-scratch segmenter can take a larger peak rate without diverging in its first
    steps, so a short budget goes further (Smith & Topin 2019).
    """
    base, kind = float(cfg["lr"]), cfg.get("schedule", "poly")
    if kind == "poly":
        return lambda step: base * (1 - step / total) ** 0.9
    if kind != "one_cycle":
        raise ValueError(f"segmenter.schedule must be 'poly' or 'one_cycle', got {kind!r}")
    rise = max(1, round(float(cfg.get("warmup", 0.3)) * total))

    def one_cycle(step: int) -> float:
        if step < rise:
            return base * (0.04 + 0.96 * step / rise)
        return base * 0.5 * (1 + math.cos(math.pi * (step - rise) / max(1, total - rise)))

    return one_cycle


def _to_model(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Normalised float inputs on the device, channels-last like the model's weights.

    On the CPU a DeepLabV3-MobileNetV3 training step at 192 px ran 1.36 times faster this way, and
    LR-ASPP at 128 px 1.08 times (BENCHMARKS.md).
    """
    return normalise(images).to(device).contiguous(memory_format=torch.channels_last)


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
        From :func:`create_segmenter`; an ensemble's member i trains with ``seed + i``.
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
        Mean training loss of every epoch (over the members, for an ensemble).

    Raises
    ------
    GroundTruthLeakError
        When ``masks`` reproduce ``ground_truth``.
    ValueError
        When the batch size or the number of images is below two.
    """
    if isinstance(model, SegmenterEnsemble):
        member_losses = []
        for i, member in enumerate(model.members):
            log.info("segmenter %d of %d (seed %d)", i + 1, len(model.members), seed + i)
            member_losses.append(
                train_segmenter(
                    member,
                    images,
                    masks,
                    cfg,
                    device=device,
                    seed=seed + i,
                    ground_truth=ground_truth,
                )
            )
        return [float(np.mean(epoch)) for epoch in zip(*member_losses, strict=True)]
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
    rate = learning_rate_schedule(cfg, total)
    model.to(device, memory_format=torch.channels_last).train()
    losses: list[float] = []
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        epoch_losses = []
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            index = order[first : first + batch_size]
            batch, labels = _augment(inputs[index], targets[index], generator)
            if not (labels != IGNORE_INDEX).any():
                # A confidence-filtered self-training mask can be all "ignore": no step, as
                # AdamW's momentum and weight decay would move the weights on no evidence.
                step += 1
                progress.update()
                continue
            logits = model(_to_model(batch, device))["out"]
            batch_labels = labels.long().to(device)
            labelled = (batch_labels != IGNORE_INDEX).sum()
            loss = (
                F.cross_entropy(logits, batch_labels, ignore_index=IGNORE_INDEX, reduction="sum")
                / labelled
            )
            if not torch.isfinite(loss):
                raise FloatingPointError(f"segmenter loss became {loss.item()} at step {step}")
            for group in optimizer.param_groups:
                group["lr"] = rate(step)
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
        model(_to_model(images[first : first + batch_size], device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


# Upsampled logits are made a strip of rows at a time, at most this many floats per strip
# (4 MB), so that memory does not grow with the image's area times the number of classes.
STRIP_VALUES = 1 << 20


def _bilinear_taps(
    size_in: int, size_out: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of 1-D linear interpolation with half-pixel centres.

    The sampling of ``F.interpolate(mode="bilinear", align_corners=False)``: output pixel ``i``
    reads the input at ``(i + 0.5) * size_in / size_out - 0.5``, clamped to the edges.
    """
    scale = size_in / size_out
    index = torch.arange(size_out, dtype=torch.float64, device=device)
    position = ((index + 0.5) * scale - 0.5).clamp(min=0)
    first = position.floor().long().clamp(max=size_in - 1)
    second = torch.where(first < size_in - 1, first + 1, first)
    weight = (position - first).clamp(0, 1).float()
    return first, second, 1 - weight, weight


def upsampled_strips(
    scores: torch.Tensor, size: tuple[int, int], strip_values: int = STRIP_VALUES
) -> Iterator[tuple[int, torch.Tensor]]:
    """Bilinear upsampling of (K, h, w) scores to (K, H, W), a strip of rows at a time.

    Yields ``(first row, (K, rows, W) strip)`` from the top. Every output value depends only on
    its own row and column, so the strips are the same whatever their height, and together they
    match ``F.interpolate(..., mode="bilinear", align_corners=False)`` up to float rounding.
    Memory: the (K, h, W) width pass plus one strip of at most ``strip_values`` floats, instead
    of K * H * W floats for the whole image.
    """
    classes, height_in, width_in = scores.shape
    height, width = size
    left, right, left_weight, right_weight = _bilinear_taps(width_in, width, scores.device)
    # In place where possible: two temporaries per pass, not five.
    rows = scores[:, :, left].mul_(left_weight).addcmul_(scores[:, :, right], right_weight)
    top, bottom, top_weight, bottom_weight = _bilinear_taps(height_in, height, scores.device)
    step = max(1, strip_values // max(1, classes * width))
    for first in range(0, height, step):
        band = slice(first, first + step)
        strip = rows[:, top[band]].mul_(top_weight[band, None])
        yield first, strip.addcmul_(rows[:, bottom[band]], bottom_weight[band, None])


def label_map(
    scores: torch.Tensor,
    size: tuple[int, int],
    confidence: float = 0.0,
    *,
    one_cell: bool = False,
) -> np.ndarray:
    """The HxW uint8 argmax of (K, h, w) scores upsampled to ``size``, strip by strip.

    Pixels whose winning probability is below ``confidence`` get the ignore label, so a
    segmenter trained on the map learns only from what its predecessor was sure of. With
    ``one_cell`` the scores are :func:`one_cell_logits`, log-probabilities that keep only
    background and each pixel's best class: the winning probability is the exp of the top
    score (what made the pixel cell or background); their softmax would renormalise the two
    and pass pixels the segmenter was not sure of.
    """
    labels = np.empty(size, dtype=np.uint8)
    for first, strip in upsampled_strips(scores, size):
        label = channel_argmax(strip).to(torch.uint8)
        if confidence > 0.0:
            winning = strip.amax(0).exp() if one_cell else strip.softmax(0).amax(0)
            label[winning < confidence] = IGNORE_INDEX
        labels[first : first + strip.shape[1]] = label.cpu().numpy()
    return labels


@dataclass(frozen=True)
class Decoding:
    """How a segmenter's class scores become label maps.

    Saved with the segmenter, so that ``w3s-predict`` decodes as the job that trained it did.

    Attributes
    ----------
    one_cell
        Every cell pixel gets the class that holds most of the cell's probability (a crop
        shows one cell, :func:`one_cell_logits`); false: each pixel its own argmax class.
    turned_views
        Predict from the mean of the 8 flipped and turned views (:func:`dihedral_logits`):
        8 forward passes.
    """

    one_cell: bool = False
    turned_views: bool = False

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> Decoding:
        """The decoding of a ``segmenter`` config or of a saved segmenter's.

        Configs and segmenter files written before an option existed decode without it.
        """
        return cls(
            one_cell=bool(cfg.get("one_cell_per_image", False)),
            turned_views=bool(cfg.get("test_time_augmentation", False)),
        )


def dihedral_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Log of the class probabilities averaged over the 8 flips and quarter turns of ``batch``.

    Training augments with exactly these views (a cell on a slide has no up or left), so each
    is as valid as the image as given; one pass still depends on the orientation, and the
    average removes that (test-time mirroring, nnU-Net's default). The log keeps the result a
    valid input to the decoders, which take logits: ``log_softmax`` of it is itself.
    """
    total = torch.zeros((), device=batch.device)
    for flipped in (False, True):
        view = batch.flip(-1) if flipped else batch
        for turns in range(4):
            probabilities = model(view.rot90(turns, (-2, -1)))["out"].float().softmax(1)
            probabilities = probabilities.rot90(-turns, (-2, -1))
            total = total + (probabilities.flip(-1) if flipped else probabilities)
    return (total / 8).clamp_min(torch.finfo(torch.float32).tiny).log()


@torch.no_grad()
def input_logits(
    model: nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    *,
    device: torch.device,
    batch_size: int = 16,
    progress: Progress | None = None,
    decoding: Decoding = Decoding(),
) -> Iterator[torch.Tensor]:
    """Class logits of every image at the segmenter's input size: one (K, S, S) tensor each.

    Parameters
    ----------
    model
        A trained segmenter.
    images
        Native HxWx3 uint8 images.
    input_size
        Side the segmenter was trained at; every image is resized to it.
    device
        Where to run.
    batch_size
        Images per forward pass.
    progress
        Counts the images; by default a new "segmenter predictions" progress line.
    decoding
        One cell class per image, the 8 turned views (:class:`Decoding`).
    """
    model.to(device, memory_format=torch.channels_last).eval()
    if progress is None:
        progress = Progress("segmenter predictions", len(images), log)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = _to_model(resize_images(chunk, input_size), device)
        logits = dihedral_logits(model, batch) if decoding.turned_views else model(batch)["out"]
        for scores in logits.float():  # on the device: the upsampling runs there too
            yield one_cell_logits(scores) if decoding.one_cell else scores
        progress.update(len(chunk))


def one_cell_logits(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of (K, S, S) logits where every cell pixel has the image's one class.

    A single-cell crop shows one white blood cell, so one class. Pixel by pixel, a segmenter
    trained on a few dozen images splits a cell between look-alike classes; here the cell's
    pixels vote instead, weighted by their class probabilities. Only the class changes: a
    pixel stays cell where its best class beats background, as in the per-pixel argmax. The
    winner's channel takes each pixel's best class score and the other classes a negligible
    floor, so the argmax is background or the winner.
    """
    log_p = logits.log_softmax(0)
    best = log_p[1:].max(0).values
    inside = best > log_p[0]
    mass = log_p[1:].exp()
    votes = (mass * inside).sum((1, 2)) if bool(inside.any()) else mass.sum((1, 2))
    winner = 1 + int(votes.argmax())
    # Finite (the upsampling mixes neighbours) and e^-30 below every real value.
    floor = float(torch.minimum(log_p[0], best).min()) - 30.0
    out = torch.full_like(log_p, floor)
    out[0], out[winner] = log_p[0], best
    return out


def native_logits(
    model: nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    *,
    device: torch.device,
    batch_size: int = 16,
    decoding: Decoding = Decoding(),
) -> Iterator[torch.Tensor]:
    """Class logits of every image at its own size: resize to ``input_size``, upsample back.

    Yields one (K, H, W) float tensor per image, in order, so a large folder never holds them
    all; one image still takes 4 K bytes per pixel, so :func:`predict` (labels only) never
    builds it. The arguments are those of :func:`input_logits`.
    """
    for image, scores in zip(
        images,
        input_logits(
            model,
            images,
            input_size,
            device=device,
            batch_size=batch_size,
            decoding=decoding,
        ),
        strict=True,
    ):
        size = (image.shape[0], image.shape[1])
        yield torch.cat([strip for _, strip in upsampled_strips(scores, size)], dim=1).cpu()


def predict(
    model: nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    *,
    device: torch.device,
    batch_size: int = 16,
    progress: Progress | None = None,
    decoding: Decoding = Decoding(),
    confidence: float = 0.0,
) -> list[np.ndarray]:
    """One HxW uint8 label map per image (0 background, k = class k - 1).

    The argmax of :func:`native_logits` (bit-identical), computed a strip of rows at a time so
    that an image's full-size logits never exist: memory per image is its label map plus a
    bounded strip. ``confidence`` is that of :func:`label_map`; the other arguments are those
    of :func:`input_logits`.
    """
    return [
        label_map(scores, (image.shape[0], image.shape[1]), confidence, one_cell=decoding.one_cell)
        for image, scores in zip(
            images,
            input_logits(
                model,
                images,
                input_size,
                device=device,
                batch_size=batch_size,
                progress=progress,
                decoding=decoding,
            ),
            strict=True,
        )
    ]


def segmenter_payload(
    model: nn.Module, cfg: Mapping[str, Any], classes: Sequence[str]
) -> dict[str, Any]:
    """Everything :func:`load_segmenter` needs, as tensors and plain values (no pickled objects)."""
    decoding = Decoding.of(cfg)
    return {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "segmenter": {
            "arch": cfg["arch"],
            "input_size": int(cfg["input_size"]),
            "one_cell_per_image": decoding.one_cell,
            "test_time_augmentation": decoding.turned_views,
            "members": ensemble_members(cfg),
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
    common.checkpoint.CheckpointError
        One line naming the file and what is wrong with it: missing, empty, truncated, not a
        PyTorch file, another kind of file (an MCT model file, a bare tensor or state dict),
        an unknown architecture or weights that do not fit it.
    """
    where = f"segmenter={path}"
    payload = read_payload(path, SEGMENTER_FILE)
    cfg, classes = payload["segmenter"], payload["classes"]
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        raise CheckpointError(f"{where}: its segmenter settings lack an input_size ({cfg!r:.80})")
    if cfg.get("arch") not in ARCHITECTURES:
        raise CheckpointError(
            f"{where}: unknown architecture {cfg.get('arch')!r}; this version knows "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    cfg, classes = {**cfg, "backbone_weights_file": None}, list(classes)
    try:
        checked_input_size(cfg)
        members = ensemble_members(cfg)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
    # Checked before the networks are built: a file naming 10^5 members would take the memory.
    if members != (held := stored_members(payload["state_dict"])):
        raise CheckpointError(
            f"{where}: its settings name {members} ensemble members, its weights hold {held}"
        )
    model = create_segmenter(cfg, len(classes) + 1)
    load_weights(model, payload["state_dict"], where, cfg["arch"])
    return model.eval(), cfg, classes
