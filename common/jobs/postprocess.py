"""``w3s-postprocess``: localization maps -> pseudo-masks -> segmenter at one hospital, scored.

    w3s-postprocess checkpoint=<run>/final_model.pt data=wbc_zxaoyou hospital=dataset1

Every choice (background constants, disk radius, Otsu channel) is made on the hospital's
validation split; every reported number is on its test split. The baselines go through the
same evaluation code as the weakly supervised stages. Outputs stay under ``output_dir``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from common.checkpoint import load_checkpoint
from common.config import CONF_DIR
from common.data import hospital_names
from common.jobs import JobError, exit_on_input_error
from common.jobs.report import markdown_table, save_figure, write_report
from common.jobs.stages import (
    Evaluation,
    disk_stage,
    make_maps,
    otsu_stage,
    pseudo_stage,
    seeds_stage,
    segmenter_stage,
)
from common.model import MCTFormerV2, create_mct_model
from common.training import resolve_device

log = logging.getLogger(__name__)


def resolve_output_dir(cfg: DictConfig, checkpoint: Path) -> Path:
    """``output_dir`` made absolute, else ``<run dir>/postprocess/<hospital>``.

    The run dir holds ``final_model.pt`` and ``checkpoints/round_NNN.pt``, so a round checkpoint
    maps to the same place as the final model.
    """
    if cfg.output_dir:
        return Path(str(cfg.output_dir)).expanduser().resolve()
    run_dir = checkpoint.parent
    if run_dir.name == "checkpoints":
        run_dir = run_dir.parent
    return run_dir / "postprocess" / str(cfg.hospital)


def load_model(cfg: DictConfig, checkpoint: Path) -> tuple[MCTFormerV2, dict[str, Any]]:
    """Rebuild the trained MCT model from its checkpoint, checking it fits the data config."""
    try:
        payload = load_checkpoint(checkpoint)
    except FileNotFoundError as error:
        raise JobError(f"checkpoint={checkpoint}: file not found") from error
    if not {"state_dict", "model", "classes"} <= payload.keys():
        raise JobError(f"checkpoint={checkpoint} is not an MCT model file (final_model.pt)")
    classes = list(payload["classes"])
    if classes != list(cfg.data.classes):
        raise JobError(
            f"the checkpoint was trained on classes {classes} but data={cfg.data.name} has "
            f"{list(cfg.data.classes)}; pick the data config the model was trained with"
        )
    model_cfg = {**payload["model"], "pretrained_file": None}  # the weights come from the file
    model = create_mct_model(model_cfg, num_classes=len(classes))
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


def check_hospital(cfg: DictConfig) -> str:
    """The configured hospital name, or a clear error listing the ones that exist."""
    names = hospital_names(cfg.data)
    if OmegaConf.is_missing(cfg, "hospital"):
        raise JobError(f"hospital=... is required; data={cfg.data.name} has: {', '.join(names)}")
    name = str(cfg.hospital)
    if name not in names:
        raise JobError(
            f"hospital={name} is not in data.hospitals of data={cfg.data.name}; "
            f"choose one of: {', '.join(names)}"
        )
    return name


def run_postprocess(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage for ``cfg.hospital`` and write the outputs; return the metrics.

    Raises
    ------
    JobError
        For a missing checkpoint, an unknown hospital or a class mismatch.
    """
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise JobError("checkpoint=... is required: the final_model.pt of a training run")
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    hospital = check_hospital(cfg)
    model, payload = load_model(cfg, checkpoint)
    out = resolve_output_dir(cfg, checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    log.info("hospital %s, model round %s, outputs in %s", hospital, payload.get("round"), out)
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    classes = list(payload["classes"])

    started = time.perf_counter()
    splits = make_maps(model, cfg, hospital, out, device)
    maps_seconds = time.perf_counter() - started
    evaluation = Evaluation(splits, len(classes) + 1, cfg.evaluation)
    chunk = int(cfg.batch_size)
    seeds, seed_labels = seeds_stage(splits, evaluation, chunk)
    seeds.seconds += maps_seconds
    pseudo, pseudo_labels = pseudo_stage(cfg, splits, evaluation, out, device)
    segmenter, predicted = segmenter_stage(
        cfg, splits, pseudo_labels["train"], evaluation, out, device, classes
    )
    stages = [seeds, pseudo, segmenter]
    if evaluation.has_truth:
        stages += [disk_stage(splits, evaluation), otsu_stage(splits, evaluation)]
    else:
        log.warning(
            "hospital %s has no ground-truth masks: outputs written, nothing scored", hospital
        )
    save_figure(
        out / "figure.png",
        splits["test"],
        seed_labels["test"],
        pseudo_labels["test"],
        predicted["test"],
    )
    summary = {
        "hospital": hospital,
        "round": payload.get("round"),
        "classes": classes,
        "images": {name: len(split.data) for name, split in splits.items()},
        "absent": evaluation.absent,
        "select_by": evaluation.select_by,
    }
    metrics = write_report(out, summary, stages)
    log.info("metrics of %s (test split):\n%s", hospital, markdown_table(stages))
    log.info("outputs in %s", out)
    return metrics


@hydra.main(config_path=str(CONF_DIR), config_name="postprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Console script ``w3s-postprocess``; input problems exit with status 2 and one message."""
    with exit_on_input_error(log):
        run_postprocess(cfg)


if __name__ == "__main__":
    main()
