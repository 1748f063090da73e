"""``w3s-experiment``: train one regime per seed, then score it with the post-training job.

Writes ``<runs_dir>/<label>/experiment.yaml`` (the composed config and the command) and, per
seed, ``seed_<s>/train/`` (models; ``metrics.jsonl`` of federated runs), ``seed_<s>/eval/``
(the post-training job's outputs per row and hospital) and ``seed_<s>/results.json`` (the
matrix cells). Federated regimes run through ``w3s-simulate`` (a real ``flwr run``); the others
in this process. The post-training job runs with its own defaults plus ``postprocess=[...]``.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.checkpoint import load_model, save_model
from common.cli import Command
from common.config import compose_config
from common.data import DataVerificationError, hospital_names, verify_data
from experiments.regimes import fine_tune, train_rounds, training_tensors
from experiments.supervised import score_segmenter, train_supervised_ceiling
from post_training.postprocess import run_postprocess
from server_app import launch

log = logging.getLogger(__name__)

CONFIG_NAME = "w3s_experiment"
# Keys of conf/w3s_experiment.yaml that the training config (conf/config.yaml) does not know.
EXPERIMENT_KEYS = ("seeds", "runs_dir", "label", "postprocess", "regime")
# Training overrides that the post-training job needs as well (which data, which device).
SHARED_WITH_POSTPROCESS = ("data", "device")
RESULTS = "results.json"


def override_key(override: str) -> str:
    """``+data.root=/x`` -> ``data.root``."""
    return override.lstrip("+~").split("=", 1)[0]


@dataclass(frozen=True)
class SeedRun:
    """One seed of one regime: its training config, regime, and where its outputs go."""

    cfg: DictConfig
    regime: DictConfig
    label: str
    training_overrides: list[str]
    postprocess_overrides: list[str]
    seed: int
    out: Path

    @property
    def hospitals(self) -> list[str]:
        """Every configured hospital: the columns of the matrix."""
        return hospital_names(self.cfg.data)

    def evaluate(self, checkpoint: Path, row: str, hospital: str) -> dict[str, Any]:
        """The post-training job with ``checkpoint`` at ``hospital``; test-split mIoU per stage."""
        cfg = compose_config(
            [
                *self.postprocess_overrides,
                f"checkpoint={checkpoint}",
                f"hospital={hospital}",
                f"output_dir={self.out / 'eval' / row_folder(row) / hospital}",
                f"seed={self.seed}",
            ],
            config_name="postprocess",
        )
        return cell_scores(run_postprocess(cfg))

    def federated(self, folder: str) -> Path:
        """A real ``flwr run`` of the configured regime (via ``w3s-simulate``)."""
        run_dir = self.out / "train" / folder
        if str(self.regime.kind) == "personalized":
            reused = self.fedavg_of_same_seed()
            if reused is not None:
                log.info("personalized: starting from FedAvg's final model %s", reused)
                return reused
        code = launch.main([*self.training_overrides, f"seed={self.seed}", f"output_dir={run_dir}"])
        if code != 0:
            raise RuntimeError(f"the federated run in {run_dir} failed (exit code {code})")
        return run_dir / "final_model.pt"

    def fedavg_of_same_seed(self) -> Path | None:
        """``<runs_dir>/fedavg``'s final model of this seed, when trained with this config.

        Personalization starts from FedAvg; when the fedavg regime already ran with the same
        config (all but the regime and output folder), its global model is reused instead of
        repeating the federated run.
        """
        source = self.out.parent.parent / "fedavg" / self.out.name / "train" / "global"
        if not (source / "final_model.pt").exists() or not (source / "config.yaml").exists():
            return None
        if comparable(OmegaConf.load(source / "config.yaml")) != comparable(self.cfg):
            log.info("personalized: %s was trained with another config, not reused", source)
            return None
        return source / "final_model.pt"


def comparable(cfg: DictConfig) -> dict[str, Any]:
    """A training config without the key that differs between FedAvg and personalization."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in ("output_dir",):
        plain.pop(key, None)
    return plain


def row_folder(row: str) -> str:
    """``local_only (hospital_a)`` -> ``local_only_hospital_a``."""
    return row.replace(" (", "_").replace(")", "").replace(" ", "_")


def cell_scores(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Test-split class-aware and binary mIoU of every stage of a post-training report, by key.

    Keys, not titles, so that rows stay comparable when the job's default methods change.
    """
    cells = {}
    for stage in metrics["stages"]:
        test = stage.get("test")
        if test:
            cells[stage["key"]] = {
                "class_aware": test["class_aware_miou"],
                "binary": test["binary_miou"],
            }
    return cells


def models_of(run: SeedRun) -> dict[str, dict[str, Path]]:
    """Train the regime; return, per matrix row, the model each hospital column is scored with."""
    cfg, hospitals, train_dir = run.cfg, run.hospitals, run.out / "train"
    kind = str(run.regime.kind)
    if kind == "local":
        rows = {}
        for index, name in enumerate(hospitals):
            model = train_rounds(cfg, training_tensors(cfg, [name]), index, f"local_only {name}")
            path = save_model(
                model.state_dict(),
                cfg,
                int(cfg.federation.rounds),
                train_dir / name / "final_model.pt",
            )
            rows[f"{run.regime.name} ({name})"] = dict.fromkeys(hospitals, path)
        return rows
    if kind == "centralized":
        model = train_rounds(cfg, training_tensors(cfg, hospitals), 0, "centralized")
        path = save_model(
            model.state_dict(),
            cfg,
            int(cfg.federation.rounds),
            train_dir / "pooled" / "final_model.pt",
        )
        return {run.label: dict.fromkeys(hospitals, path)}
    if kind == "federated":
        return {run.label: dict.fromkeys(hospitals, run.federated("global"))}
    if kind == "personalized":
        global_model = run.federated("global")
        own = {}
        for index, name in enumerate(hospitals):
            model, _ = load_model(global_model, list(cfg.data.classes))
            fine_tune(cfg, run.regime, model, training_tensors(cfg, [name]), index)
            own[name] = save_model(
                model.state_dict(),
                cfg,
                int(cfg.federation.rounds),
                train_dir / name / "final_model.pt",
            )
        return {run.label: own}
    raise ValueError(f"regime.kind={kind!r} is not one of local, centralized, federated, ...")


def supervised_rows(run: SeedRun) -> list[dict[str, Any]]:
    """The ceiling: a segmenter on true masks per hospital, scored on every hospital's test."""
    rows = []
    for name in run.hospitals:
        row = f"{run.regime.name} ({name})"
        pp_cfg = compose_config(
            [*run.postprocess_overrides, f"seed={run.seed}"], config_name="postprocess"
        )
        model = train_supervised_ceiling(pp_cfg, name, run.out / "train" / name)
        cells = {
            column: score_segmenter(
                model, pp_cfg, column, run.out / "eval" / row_folder(row) / column
            )
            for column in run.hospitals
        }
        rows.append({"row": row, "folder": row_folder(row), "trained_at": name, "cells": cells})
    return rows


def run_seed(run: SeedRun) -> dict[str, Any]:
    """Train and score one seed; return (and write) its ``results.json``."""
    if run.out.exists():
        shutil.rmtree(run.out)  # a rerun replaces a seed whole, never mixes two runs' files
    started = time.perf_counter()
    if str(run.regime.kind) == "supervised":
        rows = supervised_rows(run)
    else:
        rows = []
        for row, models in models_of(run).items():
            cells = {column: run.evaluate(path, row, column) for column, path in models.items()}
            log.info("row %s scored at %d hospitals", row, len(cells))
            rows.append({"row": row, "folder": row_folder(row), "cells": cells})
    metrics = run.out / "train" / "global" / "metrics.jsonl"
    results = {
        "label": run.label,
        "regime": str(run.regime.name),
        "seed": run.seed,
        "hospitals": run.hospitals,
        "rows": rows,
        "metrics_jsonl": str(metrics.relative_to(run.out)) if metrics.exists() else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (run.out / RESULTS).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def run_experiment(cfg: DictConfig, overrides: list[str]) -> int:
    """One regime, every seed, end to end."""
    command = f"w3s-experiment {shlex.join(overrides)}"
    overrides = [*overrides, *launch.absolute_path_overrides(cfg, Path.cwd())]
    cfg = compose_config(overrides, config_name=CONFIG_NAME)
    if problems := verify_data(cfg.data):
        raise DataVerificationError(problems)
    training = [o for o in overrides if override_key(o).split(".")[0] not in EXPERIMENT_KEYS]
    if not any(override_key(o) == "train.proximal_mu" for o in training):
        training.append(f"train.proximal_mu={cfg.regime.proximal_mu}")
    shared = [o for o in training if override_key(o).split(".")[0] in SHARED_WITH_POSTPROCESS]
    postprocess = [*shared, *(str(o) for o in cfg.postprocess)]
    out = Path(str(cfg.runs_dir)).expanduser().resolve() / str(cfg.label)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.yaml").write_text(f"# {command}\n{OmegaConf.to_yaml(cfg)}", encoding="utf-8")
    for seed in cfg.seeds:
        seed_cfg = compose_config([*training, f"seed={seed}"])
        label = str(cfg.label)
        run = SeedRun(
            seed_cfg, cfg.regime, label, training, postprocess, int(seed), out / f"seed_{seed}"
        )
        results = run_seed(run)
        log.info("%s seed %d done in %.0fs: %s", cfg.label, seed, results["seconds"], run.out)
    return 0


COMMAND = Command(
    name="w3s-experiment",
    summary=__doc__,
    config=CONFIG_NAME,
    job=run_experiment,
    keys={
        "regime": "local_only, centralized, fedavg, fedprox, personalized, supervised (required)",
        "data": "synthetic (default), wbc_zxaoyou, raabin, matek19, ...",
        "seeds": "one full run per seed, e.g. [0,1,2]",
        "runs_dir": "parent folder of every regime's runs",
        "label": "folder name of this regime's runs (default: the regime's name)",
        "postprocess": "overrides of the post-training job, e.g. [segmenter.epochs=3]",
    },
    examples=["w3s-experiment regime=fedavg data=wbc_zxaoyou seeds=[0,1,2] runs_dir=runs/wbc"],
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-experiment``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
