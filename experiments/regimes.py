"""The regimes that run in one process (no Flower): local-only, centralized, personalization.

They reuse ``pretrain_round`` and ``train_local`` round by round with the federated run's
schedule and seeds, so the only difference to FedAvg is which data a model sees and whether
weights are averaged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from common.augment import train_cache_size
from common.data import SplitTensors, split_tensors
from common.model import MCTFormerV2, create_mct_model
from common.pretrain import pretrain_round
from common.training import fine_tune, hospital_train_config, resolve_device, train_round

log = logging.getLogger(__name__)


def initial_model(cfg: DictConfig, hospital: str | None = None) -> MCTFormerV2:
    """The model every regime starts from: the same seeded initialisation as the ServerApp.

    ``hospital`` sets only its input standardisation (``model.per_hospital``), not the weights.
    """
    torch.manual_seed(cfg.seed)
    return create_mct_model(cfg.model, num_classes=len(cfg.data.classes), hospital=hospital)


def training_tensors(cfg: DictConfig, hospitals: Sequence[str]) -> SplitTensors:
    """Training splits of ``hospitals``, pooled when there are several (centralized)."""
    size = train_cache_size(cfg.model.img_size)
    parts = [split_tensors(cfg.data, name, "train", size) for name in hospitals]
    if len(parts) == 1:
        return parts[0]
    masks = [p.masks for p in parts]
    return SplitTensors(
        images=torch.cat([p.images for p in parts]),
        labels=torch.cat([p.labels for p in parts]),
        masks=None if any(m is None for m in masks) else torch.cat(masks),
    )


def train_rounds(
    cfg: DictConfig, data: SplitTensors, index: int, tag: str, hospital: str | None = None
) -> MCTFormerV2:
    """Train from the initial model: the pretraining phase, then the MCT rounds.

    One ``pretrain_round`` per ``pretrain.rounds`` (the head kept here, as the ClientApp keeps
    it), then one ``train_local`` call per ``federation.rounds``, with the ClientApp's
    learning-rate position, seed and ``hospital``'s own settings, so that a hospital training
    alone follows exactly the schedule it follows in FedAvg (``None``: pooled data, the shared
    settings).
    """
    model = initial_model(cfg, hospital)
    device = resolve_device(cfg.device)
    pretrain_rounds = int(cfg.pretrain.rounds)
    head = None
    for server_round in range(1, pretrain_rounds + 1):
        result, head = pretrain_round(
            model, data, cfg, head, server_round=server_round, hospital_index=index, device=device
        )
        log.info(
            "%s pretrain round %d/%d: loss %.4f in %.1fs",
            tag,
            server_round,
            pretrain_rounds,
            result.loss,
            result.seconds,
        )
    rounds = int(cfg.federation.rounds)
    for server_round in range(1, rounds + 1):
        result = train_round(
            model,
            data,
            cfg,
            server_round=server_round,
            hospital_index=index,
            device=device,
            hospital=hospital,
        )
        log.info(
            "%s round %d/%d: loss %.4f on %d images in %.1fs",
            tag,
            server_round,
            rounds,
            result.loss,
            result.num_examples,
            result.seconds,
        )
    return model


def fine_tune_at(
    cfg: DictConfig,
    regime: DictConfig,
    model: MCTFormerV2,
    data: SplitTensors,
    index: int,
    hospital: str,
) -> None:
    """Personalization: ``regime.finetune_epochs`` more epochs at one hospital, in place.

    At ``regime.finetune_lr_scale`` x ``train.lr`` with the hospital's own train settings.
    """
    epochs = int(regime.finetune_epochs)
    own = OmegaConf.to_container(hospital_train_config(cfg, hospital), resolve=True)
    result = fine_tune(
        model,
        data,
        own,
        epochs=epochs,
        lr_scale=float(regime.finetune_lr_scale),
        device=resolve_device(cfg.device),
        seed=cfg.seed * 100_003 + 999_983 + index,
    )
    log.info("fine-tune %d epochs at hospital %s: loss %.4f", epochs, hospital, result.loss)
