"""Federated self-supervised pretraining by parametric instance discrimination.

The product cannot assume ImageNet weights, and a ViT trained from scratch on a few hundred
crops learns whatever predicts the label, often the background. Cao et al. (ECCV 2022) make
ViTs learn from a few thousand images by first training them to tell every image apart (each
image its own class), with CutMix and label smoothing. Here each hospital does that on its own
training crops, as federated rounds before the MCT rounds (``pretrain=instance``): the linear
instance head has one output per local image, so it stays at the hospital (kept in the
ClientApp's node state between rounds) and only the backbone's weights are averaged.
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

# Pretraining batches are plain crops of one image each: the weak-label levers do not apply.
NO_LEVERS: dict[str, Any] = {
    "negatives": {"fraction": 0.0, "crop": 0.3},
    "mosaic_p": 0.0,
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
        This hospital's instance head from its previous round, or None (first round, or the
        number of local images changed, which starts a new head).
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
    head = nn.Linear(model.embed_dim, n)
    if head_state is not None and tuple(head_state["weight"].shape) == (n, model.embed_dim):
        head.load_state_dict(dict(head_state))
    head.to(device)
    seed = int(cfg.seed) * 100_003 + server_round * 1_009 + hospital_index + 7
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
        objective=instance_objective(head, pre, torch.Generator().manual_seed(seed)),
        num_targets=n,
        extra_parameters=list(head.parameters()),
    )
    return result, {k: v.detach().cpu() for k, v in head.state_dict().items()}
