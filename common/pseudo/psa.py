"""``psa``: AffinityNet trained on confident map labels, then a random walk (docs/method.md §3).

Differences from PSA, all forced by what is available here (reasons in docs/method.md §3):

- backbone: a torchvision ResNet (``weights=None`` unless a local file is given) read as a
  stride-8 feature pyramid (layer2/3/4 -> 1x1 conv to 64/128/256 + ELU, upsampled to stride 8,
  concatenated, 1x1 conv + ELU) instead of ResNet38 with output stride 8;
- images are resized to one square ``input_size`` (a multiple of 8) instead of 448 crops;
- no dense CRF on the confident labels (pydensecrf does not build here);
- pairs include every in-bounds neighbour within the radius: PSA only takes pair sources from an
  interior crop, which on 12-16 cell grids would drop most of the border.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.transforms import v2

from common.augment import normalise
from common.imaging import resize_images
from common.progress import Progress
from common.pseudo.base import MapRecord, PseudoMasker
from common.pseudo.walk import transition_matrix, walk_on_grid

log = logging.getLogger(__name__)

STRIDE = 8
IGNORE = 255
# Channels of the three reduced pyramid levels, as PSA's f8_3/f8_4/f8_5 (64 + 128 + 256 = 448).
PYRAMID_CHANNELS = (64, 128, 256)
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def pair_offsets(radius: int) -> list[tuple[int, int]]:
    """PSA's one-directional neighbour offsets (dy, dx) with dx^2 + dy^2 < radius^2.

    (0, 1..r-1), then for dy in 1..r-1 every dx in -(r-1)..r-1 inside the circle: 34 at r = 5.
    """
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-radius + 1, radius)
        if dx * dx + dy * dy < radius * radius
    ]
    return offsets


@cache
def radius_pairs(height: int, width: int, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (from, to) indices of every in-bounds pair of a grid within ``radius``, one direction.

    Parameters
    ----------
    height, width
        Grid size.
    radius
        PSA's radius (5 on the stride-8 grid).

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        Two (P,) int64 tensors; pair i links cell ``from[i]`` to cell ``to[i]``.
    """
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    sources, targets = [], []
    for dy, dx in pair_offsets(radius):
        ty, tx = ys + dy, xs + dx
        inside = (ty < height) & (tx >= 0) & (tx < width)
        sources.append((ys * width + xs)[inside])
        targets.append((ty * width + tx)[inside])
    return torch.cat(sources), torch.cat(targets)


def pair_labels(
    labels: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split pairs of a label grid into background-positive, foreground-positive and negative.

    Parameters
    ----------
    labels
        (B, h, w) integer labels: 0 background, k class, 255 uncertain.
    sources, targets
        Pair indices of :func:`radius_pairs`.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        (B, P) bool masks. bg-pos: both 0; fg-pos: equal, non-zero, neither 255; neg: different
        and neither 255. A pair touching 255 is in none of them.
    """
    flat = labels.flatten(1).long()
    start, end = flat[:, sources], flat[:, targets]
    valid = (start != IGNORE) & (end != IGNORE)
    same = start == end
    return (same & (start == 0)), (same & (start != 0) & valid), (~same & valid)


def confident_labels(
    maps: torch.Tensor, grid: tuple[int, int], alpha_low: float, alpha_high: float
) -> torch.Tensor:
    """PSA's label grid from maps: confident classes, confident background, 255 in between.

    Background scores (1 - max_c maps)^alpha: the low exponent gives a large background, so a
    class winning against it is confident foreground; the high exponent gives a small one, so
    background winning against it is confident background. Scores are mean-pooled to the grid
    before the argmax, as the reference pools its CRF scores by 8.

    Parameters
    ----------
    maps
        (C, H, W) maps in [0, 1].
    grid
        (h, w) stride-8 grid of the AffinityNet features.
    alpha_low, alpha_high
        Background exponents (PSA 4 / 32, MCT 1 / 12).

    Returns
    -------
    torch.Tensor
        (h, w) uint8 labels in {0, 1..C, 255}.
    """
    rest = (1 - maps.amax(0, keepdim=True)).clamp(min=0)
    low = torch.cat([rest**alpha_low, maps])
    high = torch.cat([rest**alpha_high, maps])
    low_labels = F.adaptive_avg_pool2d(low[None], grid)[0].argmax(0)
    high_labels = F.adaptive_avg_pool2d(high[None], grid)[0].argmax(0)
    labels = torch.where(low_labels == 0, IGNORE, low_labels)
    labels = torch.where(high_labels == 0, 0, labels)
    return labels.to(torch.uint8)


def pair_affinity(
    features: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """a_ij = exp(-mean_ch |f_i - f_j|) for every pair, (B, P)."""
    flat = features.flatten(2)
    return torch.exp(-(flat[:, :, sources] - flat[:, :, targets]).abs().mean(1))


def affinity_loss(
    affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> torch.Tensor:
    """PSA's loss 1/4 L_bg + 1/4 L_fg + 1/2 L_neg, each a mean over its pair set.

    L_pos = mean of -log(a + 1e-5); L_neg = mean of -log(1 + 1e-5 - a); an empty set adds 0.
    """

    def mean_over(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        weights = mask.to(values.dtype)
        return (weights * values).sum() / (weights.sum() + 1e-5)

    positive = -torch.log(affinity + 1e-5)
    negative = -torch.log(1 + 1e-5 - affinity)
    return (
        mean_over(bg_pos, positive) / 4
        + mean_over(fg_pos, positive) / 4
        + mean_over(neg, negative) / 2
    )


def dense_affinity(
    affinity: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, nodes: int
) -> torch.Tensor:
    """(N, N) matrix of pair affinities in both directions, 1 on the diagonal, 0 elsewhere."""
    dense = torch.eye(nodes, dtype=affinity.dtype, device=affinity.device)
    dense[sources, targets] = affinity
    dense[targets, sources] = affinity
    return dense


class AffinityNet(nn.Module):
    """Pixel-embedding network on a torchvision ResNet's stride-8 feature pyramid.

    Parameters
    ----------
    backbone
        A torchvision ResNet name (``resnet18`` for CPU, ``resnet50`` for the paper preset).
    weights_file
        Optional local backbone state dict (e.g. ImageNet ResNet weights); never downloaded.
    """

    def __init__(self, backbone: str = "resnet18", weights_file: str | None = None) -> None:
        super().__init__()
        if backbone not in RESNETS:
            raise ValueError(f"psa.network.backbone must be one of {RESNETS}, got {backbone!r}")
        net = getattr(torchvision.models, backbone)(weights=None)
        if weights_file:
            _load_backbone(net, Path(weights_file))
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layers = nn.ModuleList([net.layer2, net.layer3, net.layer4])
        deepest = net.fc.in_features
        widths = (deepest // 4, deepest // 2, deepest)
        self.reduce = nn.ModuleList(
            nn.Conv2d(width, out, 1) for width, out in zip(widths, PYRAMID_CHANNELS, strict=True)
        )
        total = sum(PYRAMID_CHANNELS)
        self.fuse = nn.Conv2d(total, total, 1)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters not in the backbone; they train with a 10x learning rate, as in PSA."""
        return [*self.reduce.parameters(), *self.fuse.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 448, ceil(H/8), ceil(W/8)) features."""
        x = self.stem(images)
        levels = []
        for layer, reduce in zip(self.layers, self.reduce, strict=True):
            x = layer(x)
            levels.append(F.elu(reduce(x)))
        size = levels[0].shape[-2:]
        levels = [levels[0]] + [
            F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            for level in levels[1:]
        ]
        return F.elu(self.fuse(torch.cat(levels, dim=1)))


def _load_backbone(net: nn.Module, path: Path) -> None:
    """Load a local ResNet state dict; the classifier may be missing or of another size."""
    if not path.is_file():
        raise FileNotFoundError(f"psa.network.weights_file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the backbone: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    log.info("AffinityNet backbone initialised from %s", path)


class PSAMasker(PseudoMasker):
    """PSA pseudo-masks: AffinityNet on confident labels, random walk on its affinities.

    Parameters
    ----------
    cfg
        The ``pseudo`` config node of ``conf/pseudo/psa.yaml``.
    """

    name = "psa"

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.input_size = int(cfg["input_size"])
        if self.input_size % STRIDE:
            raise ValueError(f"psa.input_size must be a multiple of {STRIDE}: {self.input_size}")
        self.radius = int(cfg["radius"])
        self.alpha_low, self.alpha_high = float(cfg["alpha_low"]), float(cfg["alpha_high"])
        self.beta, self.logt = float(cfg["beta"]), int(cfg["logt"])
        self.train_cfg = dict(cfg["train"])
        # Built here to check the backbone and its file before any work; fit builds it again
        # from its seed.
        self.network_args = (cfg["network"]["backbone"], cfg["network"]["weights_file"])
        self.network = AffinityNet(*self.network_args)
        self.device = torch.device("cpu")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PSAMasker:
        """Build the untrained method from its config."""
        return cls(cfg)

    def _grid(self) -> tuple[int, int]:
        side = -(-self.input_size // STRIDE)
        return side, side

    def fit(self, records: Sequence[MapRecord], *, device: torch.device, seed: int) -> None:
        """Train AffinityNet on the confident labels of the training split's maps.

        Its starting weights come from ``seed``, not from however many random numbers the job
        drew before (the site's fine-tune, earlier ``pseudo.tune`` candidates).
        """
        if not records:
            raise ValueError("psa needs at least one training image")
        torch.manual_seed(seed)
        self.network = AffinityNet(*self.network_args)
        generator = torch.Generator().manual_seed(seed)
        cfg = self.train_cfg
        grid = self._grid()
        images = resize_images([r.image for r in records], self.input_size)
        labels = torch.stack(
            [confident_labels(r.maps, grid, self.alpha_low, self.alpha_high) for r in records]
        )
        sources, targets = radius_pairs(*grid, self.radius)
        jitter = v2.ColorJitter(*cfg["color_jitter"])
        net = self.network.to(device).train()
        new = {id(p) for p in net.new_parameters()}
        groups = [
            {"params": [p for p in net.parameters() if id(p) not in new], "lr": cfg["lr"]},
            {"params": net.new_parameters(), "lr": cfg["lr"] * 10},
        ]
        optimizer = torch.optim.SGD(
            groups, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"]
        )
        batch_size = min(int(cfg["batch_size"]), len(records))
        steps_per_epoch = max(len(records) // batch_size, 1)
        total = int(cfg["epochs"]) * steps_per_epoch
        progress = Progress("psa affinity training steps", total, log)
        step = 0
        for _ in range(int(cfg["epochs"])):
            order = torch.randperm(len(records), generator=generator)
            for first in range(0, steps_per_epoch * batch_size, batch_size):
                index = order[first : first + batch_size]
                batch, batch_labels = _flip_jointly(images[index], labels[index], generator)
                batch = normalise(torch.stack([jitter(image) for image in batch])).to(device)
                bg_pos, fg_pos, neg = pair_labels(batch_labels.to(device), sources, targets)
                affinity = pair_affinity(net(batch), sources, targets)
                loss = affinity_loss(affinity, bg_pos, fg_pos, neg)
                scale = (1 - step / total) ** 0.9
                for group, multiplier in zip(optimizer.param_groups, (1, 10), strict=True):
                    group["lr"] = cfg["lr"] * multiplier * scale
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                progress.update(loss=loss.item())
        self.device = device

    @torch.no_grad()
    def transitions(self, records: Sequence[MapRecord]) -> torch.Tensor:
        """(B, N, N) random-walk transition matrices of the records' images."""
        net = self.network.to(self.device).eval()
        grid = self._grid()
        images = normalise(resize_images([r.image for r in records], self.input_size))
        features = net(images.to(self.device))
        sources, targets = radius_pairs(*grid, self.radius)
        nodes = grid[0] * grid[1]
        dense = torch.stack(
            [
                dense_affinity(a, sources, targets, nodes)
                for a in pair_affinity(features, sources, targets)
            ]
        )
        return transition_matrix(dense, self.beta, self.logt).cpu()

    def propagate(
        self, records: Sequence[MapRecord], scores: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Walk each image's scores with its AffinityNet transition matrix."""
        if not records:
            return []
        return [
            walk_on_grid(score, transition, self._grid(), score.shape[1:])
            for score, transition in zip(scores, self.transitions(records), strict=True)
        ]


def _flip_jointly(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal and vertical flips of a batch, applied to images and label grids alike.

    Both tensors end in (height, width), so one flip dim serves both.
    """
    for dim in (-1, -2):
        if torch.rand((), generator=generator) < 0.5:
            images, labels = images.flip(dim), labels.flip(dim)
    return images, labels
