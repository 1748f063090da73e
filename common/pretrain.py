"""Federated self-supervised pretraining: rounds on the hospitals' own crops before the MCT rounds.

The product cannot assume ImageNet weights, and a ViT trained from scratch on a few hundred
crops learns whatever predicts the label, often the background. Two objectives give the
backbone something else to learn first, each hospital on its own training crops:

- ``pretrain=instance``: parametric instance discrimination (Cao et al., ECCV 2022), each image
  its own class, with CutMix and label smoothing. It shapes what tells whole images apart.
- ``pretrain=masked``: masked image modelling (SimMIM, Xie et al., CVPR 2022). Blocks of each
  crop are painted in its mean colour and the backbone must redraw their pixels from what is
  left. Redrawing a hidden piece of a cell needs to know what surrounds what, so it shapes the
  patch features that the foreground head later splits.

Either head (one output per local image, or the per-patch pixel decoder) stays at the hospital,
kept in the ClientApp's node state between rounds; only the backbone's weights are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from common.data import SplitTensors
from common.levers import LEVER_WEIGHTS
from common.model import MCTFormerV2
from common.training import Objective, TrainResult, train_local

PRETRAIN_METHODS = ("instance", "masked")

# Pretraining batches are plain crops of one image each: the weak-label levers do not apply.
NO_LEVERS: dict[str, Any] = {
    "negatives": {"fraction": 0.0, "crop": 0.3},
    "mosaic_p": 0.0,
    "copy_paste": 0.0,
    "foreground": dict.fromkeys(LEVER_WEIGHTS, 0.0),
}


def embedding(model: MCTFormerV2, images: torch.Tensor) -> torch.Tensor:
    """Image embedding (B, D): the mean final patch token, what the MCT heads later read."""
    features = model(images).patch_features
    assert features is not None  # every forward fills it
    return features.mean(dim=(2, 3))


def cutmix(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a random box of each image's batch partner (the reversed batch) into it.

    The box's share of the area is uniform in [0, 1] (CutMix's Beta(1, 1)); targets mix in
    proportion to the pixels each image keeps, so a model must recognise an image from any
    part of it.
    """
    if len(images) < 2:
        return images, targets
    share = float(torch.rand((), generator=generator))
    height, width = images.shape[-2:]
    box_h, box_w = int(height * share**0.5), int(width * share**0.5)
    top = int(torch.randint(0, height - box_h + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - box_w + 1, (1,), generator=generator))
    rows, cols = slice(top, top + box_h), slice(left, left + box_w)
    mixed = images.clone()
    mixed[..., rows, cols] = images.flip(0)[..., rows, cols]
    kept = 1.0 - box_h * box_w / (height * width)
    return mixed, kept * targets + (1.0 - kept) * targets.flip(0)


def instance_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against soft instance targets, smoothed towards the uniform distribution."""
    n = logits.shape[1]
    soft = targets * (1.0 - smoothing) + smoothing / n
    return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def instance_objective(
    head: nn.Linear, cfg: Mapping[str, Any], generator: torch.Generator
) -> Objective:
    """Loss of one step: CutMix (with probability ``cutmix_p``), embed, classify the instance."""

    def objective(model: MCTFormerV2, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if float(torch.rand((), generator=generator)) < float(cfg["cutmix_p"]):
            images, targets = cutmix(images, targets, generator)
        logits = head(embedding(model, images))
        return instance_loss(logits, targets, float(cfg["label_smoothing"]))

    return objective


def block_mask(
    images: torch.Tensor, block: int, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """Which pixels to hide (B, 1, H, W), 1 = hidden: square blocks, each hidden with ``ratio``.

    Blocks of ``block`` pixels a side (SimMIM's 32 px masks at 224 px) leave no visible
    neighbour inside a hidden block, so a patch cannot be redrawn from the patch beside it.
    """
    height, width = images.shape[-2:]
    rows, cols = -(-height // block), -(-width // block)
    hidden = (torch.rand(len(images), 1, rows, cols, generator=generator) < ratio).float()
    hidden = hidden.repeat_interleave(block, 2).repeat_interleave(block, 3)
    return hidden[..., :height, :width].to(images)


def masked_objective(
    decoder: nn.Conv2d, cfg: Mapping[str, Any], patch: int, generator: torch.Generator
) -> Objective:
    """Loss of one step: hide blocks, encode the rest, redraw the hidden pixels (mean L1)."""
    block = int(cfg["mask_block"]) * patch

    def objective(model: MCTFormerV2, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = block_mask(images, block, float(cfg["mask_ratio"]), generator)
        fill = images.mean(dim=(2, 3), keepdim=True)
        features = model(images * (1 - hidden) + fill * hidden).patch_features
        assert features is not None  # every forward fills it
        redrawn = F.pixel_shuffle(decoder(features), patch)
        return ((redrawn - images).abs() * hidden).sum() / (images.shape[1] * hidden.sum() + 1e-6)

    return objective


def pretrain_objective(
    model: MCTFormerV2, num_images: int, cfg: Mapping[str, Any], generator: torch.Generator
) -> tuple[nn.Module, Objective]:
    """The hospital-private head of ``cfg['method']`` and the step loss that trains it.

    The head is instance logits (one per local image) or a pixel decoder (each patch's pixels).
    """
    method = cfg["method"]
    if method == "masked":
        decoder = nn.Conv2d(model.embed_dim, 3 * model.patch_size**2, kernel_size=1)
        return decoder, masked_objective(decoder, cfg, model.patch_size, generator)
    if method == "instance":
        head = nn.Linear(model.embed_dim, num_images)
        return head, instance_objective(head, cfg, generator)
    raise ValueError(f"pretrain.method={method}: expected one of {', '.join(PRETRAIN_METHODS)}")


def pretrain_round(
    model: MCTFormerV2,
    data: SplitTensors,
    cfg: DictConfig,
    head_state: Mapping[str, torch.Tensor] | None,
    *,
    server_round: int,
    hospital_index: int,
    device: torch.device,
) -> tuple[TrainResult, dict[str, torch.Tensor]]:
    """One hospital's local epochs of pretraining round ``server_round`` (counted from 1).

    Parameters
    ----------
    model
        The global model; its backbone is trained in place (its heads get no gradient).
    data
        The hospital's training crops; their labels are not used.
    cfg
        The composed config; ``cfg.pretrain`` holds the optimiser, schedule and augmentation.
    head_state
        This hospital's head from its previous round, or None (first round). A head whose
        shapes no longer fit (the number of local images changed) is started afresh.
    server_round
        The pretraining round, counted from 1: the learning-rate position and the seed.
    hospital_index
        This hospital's index, for its seed.
    device
        Where to train.

    Returns
    -------
    tuple
        The training result, and the head's state to keep for the next round.
    """
    n = len(data.labels)
    pre = OmegaConf.to_container(cfg.pretrain, resolve=True)
    assert isinstance(pre, dict)
    seed = int(cfg.seed) * 100_003 + server_round * 1_009 + hospital_index + 7
    # A new head draws its initial weights from the global generator: seeded here, they do not
    # depend on what the process ran before (another hospital's round, a resumed run's start).
    torch.manual_seed(seed)
    head, objective = pretrain_objective(model, n, pre, torch.Generator().manual_seed(seed))
    shapes = {k: v.shape for k, v in head.state_dict().items()}
    if head_state is not None and {k: v.shape for k, v in head_state.items()} == shapes:
        head.load_state_dict(dict(head_state))
    head.to(device)
    instances = SplitTensors(data.images, torch.arange(n), None)
    local_epochs = int(pre["local_epochs"])
    result = train_local(
        model,
        instances,
        {**pre, "levers": NO_LEVERS},
        start_epoch=(server_round - 1) * local_epochs,
        total_epochs=int(pre["rounds"]) * local_epochs,
        device=device,
        seed=seed,
        objective=objective,
        num_targets=n,
        extra_parameters=list(head.parameters()),
    )
    return result, {k: v.detach().cpu() for k, v in head.state_dict().items()}
