"""Personalization: the hospital fine-tunes the global model on its own images before the maps.

A lever that makes one site's maps cover the whole cell (compactness, at a site whose cells
are one colour on a plain background) moves the shared features away from what separates
another site's cells when it runs inside the federation (docs/localization.md). Run here, after
the last round and on this site's training split only, it changes this site's copy and no
one else's; nothing leaves the site. The fine-tuned model is kept where its maps beat the
global model's on this site's validation split (where it has no ground truth, as configured).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from common.arrays import average_state_dicts
from common.augment import magnitude_problem, train_cache_size
from common.checkpoint import run_config, save_model
from common.data import split_tensors
from common.errors import JobError
from common.model import MCTFormerV2
from common.training import TrainResult, fine_tune, hospital_train_config
from post_training.stages import Evaluation, Split, Stage, make_maps, seeds_stage

log = logging.getLogger(__name__)

# The fine-tuned model, in the hospital's output folder (w3s-stages reads it from there).
PERSONALIZED_MODEL = "personalized_model.pt"


def personal_train_config(payload: dict[str, Any], cfg: DictConfig, hospital: str) -> dict:
    """The training run's settings for ``hospital`` with ``personalize.train`` merged over them.

    Raises
    ------
    JobError
        For a model file without its run's config, a ``personalize.train`` key that the
        training settings do not have, or a RandAugment magnitude off timm's scale.
    """
    if (trained := run_config(payload, str(cfg.checkpoint))) is None:
        raise JobError(
            f"checkpoint={cfg.checkpoint} carries no training config to fine-tune with; "
            "pass personalize.epochs=0"
        )
    OmegaConf.set_struct(trained, True)  # as composed: a key the run did not have is refused
    try:
        merged = OmegaConf.merge(hospital_train_config(trained, hospital), cfg.personalize.train)
    except (ConfigKeyError, ValidationError) as error:
        raise JobError(f"personalize.train: {str(error).splitlines()[0]}") from None
    settings = OmegaConf.to_container(merged, resolve=True)
    # A model file of a run that read the magnitude on torchvision's 31 levels may hold up to 30.
    if problem := magnitude_problem(settings["augment"]):
        raise JobError(
            f"personalize: the fine-tune takes the run's {problem}; set "
            "personalize.train.augment.randaugment_magnitude, or personalize.epochs=0"
        )
    return settings


def fine_tuned_model(
    model: MCTFormerV2,
    payload: dict[str, Any],
    cfg: DictConfig,
    hospital: str,
    device: torch.device,
) -> tuple[MCTFormerV2, TrainResult]:
    """A copy of ``model`` fine-tuned on ``hospital``'s training split.

    With ``personalize.copies`` > 1 that many copies are fine-tuned from the same start, each
    with its own seed (the job's seed plus its index, so the first is the single fine-tune),
    and their weights are averaged: a weight soup. A few dozen images make one fine-tune's maps
    depend on its draw of batches and augmentations (Dataset 2's moved by 7 points between
    seeds); fine-tunes of one starting model stay in one basin, so their average is one model
    that scores about their mean (docs/localization.md).

    Raises
    ------
    JobError
        For a setting the fine-tune refuses (a foreground lever on a model without the head,
        say), naming ``personalize``.
    """
    train_cfg = personal_train_config(payload, cfg, hospital)
    data = split_tensors(cfg.data, hospital, "train", train_cache_size(model.img_size))
    copies = []
    for index in range(int(cfg.personalize.copies)):
        tuned = copy.deepcopy(model)
        try:
            result = fine_tune(
                tuned,
                data,
                train_cfg,
                epochs=int(cfg.personalize.epochs),
                lr_scale=float(cfg.personalize.lr_scale),
                device=device,
                seed=int(cfg.seed) + index,
                min_steps=int(cfg.personalize.min_steps),
            )
        except ValueError as error:
            raise JobError(
                f"personalize: {error}; personalize.epochs=0 uses the global model as it is"
            ) from None
        copies.append((tuned, result))
    tuned, result = copies[0]
    if len(copies) > 1:
        tuned.load_state_dict(average_state_dicts([c.state_dict() for c, _ in copies]))
        result = replace(
            result,
            loss=float(np.mean([r.loss for _, r in copies])),
            seconds=sum(r.seconds for _, r in copies),
        )
    return tuned.eval(), result


@dataclass
class SiteMaps:
    """One model's maps of every split and its maps row (the seeds stage)."""

    splits: dict[str, Split]
    seeds: Stage
    labels: dict[str, list[np.ndarray]]


def kept_model(candidates: dict[str, SiteMaps], evaluation: Evaluation) -> str:
    """The name of the candidate whose maps score best on validation; ties keep the first.

    Without ground truth nothing can be compared, so the last candidate (the configured
    fine-tune) is used, as every other setting takes its configured value there.
    """
    if not evaluation.has_truth:
        return list(candidates)[-1]
    return evaluation.select(list(candidates), lambda name: candidates[name].labels["val"])


def personalize_stage(
    model: MCTFormerV2,
    payload: dict[str, Any],
    cfg: DictConfig,
    hospital: str,
    global_maps: SiteMaps,
    evaluation: Evaluation,
    out: Path,
    device: torch.device,
) -> tuple[SiteMaps, dict[str, Any]]:
    """Fine-tune, and keep whichever model's maps score better on validation.

    Ties keep the global model. A kept fine-tuned model is written to ``out``, so that the
    folder holds the model its maps came from.
    """
    tuned, result = fine_tuned_model(model, payload, cfg, hospital, device)
    splits = make_maps(tuned, cfg, hospital, device)
    seeds, labels = seeds_stage(splits, evaluation, int(cfg.batch_size))
    tuned_maps = SiteMaps(splits, seeds, labels)
    candidates = {"global": global_maps, "personalized": tuned_maps}
    kept = kept_model(candidates, evaluation)
    if kept == "personalized":
        trained = run_config(payload, str(cfg.checkpoint))
        save_model(
            tuned.state_dict(),
            trained,
            payload["round"],
            out / PERSONALIZED_MODEL,
            payload.get("splits"),
        )
    summary = {
        "copies": int(cfg.personalize.copies),
        "epochs": result.epochs,
        "images": result.num_examples,
        "loss": round(result.loss, 4),
        "kept": kept,
        "val_maps": {
            name: maps.seeds.scores["val"].to_dict() if maps.seeds.scores else None
            for name, maps in candidates.items()
        },
    }
    log.info(
        "personalized at %s: %d x %d epochs on %d images (loss %.4f, %.1fs); maps of the %s "
        "model kept",
        hospital,
        summary["copies"],
        summary["epochs"],
        result.num_examples,
        result.loss,
        result.seconds,
        kept,
    )
    chosen = candidates[kept]
    chosen.seeds.choice["model"] = kept
    return chosen, summary
