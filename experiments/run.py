"""``w3s-experiment``: train one regime per seed (and fold), then score it with post-training.

Writes ``<runs_dir>/<label>/experiment.yaml`` (the composed config and the commands) and, per
run, ``seed_<s>/train/`` (models; ``metrics.jsonl`` of federated runs), ``seed_<s>/eval/``
(the post-training job's outputs per row and hospital) and ``seed_<s>/results.json`` (the
matrix cells). With ``folds=[...]`` (cross-validation, ``data.split.folds=K``) every fold gets
its own ``fold_<f>/`` above the seed folders. Federated regimes run through ``w3s-simulate``
(a real ``flwr run``); the others in this process. The post-training job runs with its own
defaults plus ``postprocess=[...]``. A rerun skips every run whose ``results.json`` exists
(it is written last and atomically) and redoes any run folder without one.
"""

from __future__ import annotations

import functools
import json
import logging
import shlex
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from common.checkpoint import load_model, save_model
from common.cli import Command, compose_checked, override_key
from common.config import compose_config, number_setting
from common.data import DataVerificationError, hospital_names, verify_data
from common.errors import JobError
from common.files import write_text_atomically
from experiments.regimes import fine_tune_at, train_rounds, training_tensors
from experiments.supervised import score_segmenter, train_supervised_ceiling
from post_training.postprocess import (
    check_postprocess_settings,
    foreground_head_settings,
    run_postprocess,
)
from post_training.stages import headline_scores
from server_app import launch

log = logging.getLogger(__name__)

CONFIG_NAME = "w3s_experiment"
# Stands for a setting a config does not have (None is a setting).
_ABSENT = object()
# Keys of conf/w3s_experiment.yaml that the training config (conf/config.yaml) does not know.
EXPERIMENT_KEYS = ("seeds", "folds", "runs_dir", "label", "postprocess", "regime")
# Training overrides that the post-training job needs as well (which data, which device).
SHARED_WITH_POSTPROCESS = ("data", "device")
RESULTS = "results.json"
# How experiment.yaml keeps each command that ran under a label: w3s-report reads them back.
COMMAND_LINE = "# w3s-experiment "
# The data config's mapping of hospital name to its reader settings.
HOSPITALS = "data.hospitals"


def run_folder(fold: int | None, seed: int) -> Path:
    """Where one run lives under its label: ``seed_<s>``, or ``fold_<f>/seed_<s>`` when folded.

    Without folds the layout stays the one of earlier runs dirs, so they remain readable.
    """
    seed_dir = Path(f"seed_{seed}")
    return seed_dir if fold is None else Path(f"fold_{fold}") / seed_dir


def fold_overrides(fold: int | None) -> list[str]:
    """The split override of one fold; training and post-training both get it (same test)."""
    return [] if fold is None else [f"data.split.fold={fold}"]


@dataclass(frozen=True)
class SeedRun:
    """One seed (and fold) of one regime: its training config, regime, and where outputs go."""

    cfg: DictConfig
    regime: DictConfig
    label: str
    training_overrides: list[str]
    postprocess_overrides: list[str]
    seed: int
    runs_dir: Path
    fold: int | None = None

    @property
    def out(self) -> Path:
        """The run folder, ``<runs_dir>/<label>/[fold_<f>/]seed_<s>``."""
        return self.runs_dir / self.label / run_folder(self.fold, self.seed)

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
        """A real ``flwr run`` of the configured training (via ``w3s-simulate``), or its model.

        A federated model of the same training config, fold and seed already under ``runs_dir``
        (the same FedAvg scored with another post-training chain, FedAvg before personalization,
        this run's own training before an interrupted scoring) is reused instead of trained
        again: the training does not depend on what is done with its model.
        """
        reused = self.same_training()
        if reused is not None:
            log.info("%s: reusing %s, trained with the same config", self.label, reused)
            return reused
        run_dir = self.out / "train" / folder
        code = launch.main([*self.training_overrides, f"seed={self.seed}", f"output_dir={run_dir}"])
        if code != 0:
            raise RuntimeError(f"the federated run in {run_dir} failed (exit code {code})")
        return run_dir / "final_model.pt"

    def same_training(self) -> Path | None:
        """A final global model of this fold and seed under any label, trained with this config.

        The comparison covers every training setting but the output folder, so FedProx
        (another ``train.proximal_mu``) or another recipe is never taken for FedAvg. This
        run's own kept training comes first; of another config it is removed: with another
        label's model reused, its ``metrics.jsonl`` would be recorded as this run's training.
        """
        folder = run_folder(self.fold, self.seed) / "train" / "global"
        own = self.out / "train" / "global"
        others = (label / folder for label in sorted(self.runs_dir.glob("*/")))
        for source in [own, *(other for other in others if other != own)]:
            if not (source / "final_model.pt").exists() or not (source / "config.yaml").exists():
                continue
            trained = comparable(OmegaConf.load(source / "config.yaml"))
            if not config_changes(_flat(trained), _flat(comparable(self.cfg))):
                return source / "final_model.pt"
            log.info("%s: %s was trained with another config, not reused", self.label, source)
            if source == own:
                shutil.rmtree(own)
        return None


# Where a training writes, not what it trains: output_dir differs between FedAvg and
# personalization, and the other two follow the user's environment (W3S_OUTPUT_ROOT, HOME).
WHERE_KEYS = ("output_dir", "output_root", "site_state_dir")


def comparable(cfg: DictConfig) -> dict[str, Any]:
    """A training config without the keys that say where it writes (:data:`WHERE_KEYS`)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in WHERE_KEYS:
        plain.pop(key, None)
    return plain


def row_folder(row: str) -> str:
    """``local_only (hospital_a)`` -> ``local_only_hospital_a``."""
    return row.replace(" (", "_").replace(")", "").replace(" ", "_")


def cell_scores(metrics: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Test-split :func:`headline_scores` of every stage of a post-training report, by key.

    Keys, not titles, so that rows stay comparable when the job's default methods change.
    """
    return {
        stage["key"]: headline_scores(stage["test"])
        for stage in metrics["stages"]
        if stage.get("test")
    }


def models_of(run: SeedRun) -> dict[str, dict[str, Path]]:
    """Train the regime; return, per matrix row, the model each hospital column is scored with."""
    cfg, hospitals, train_dir = run.cfg, run.hospitals, run.out / "train"
    kind = str(run.regime.kind)
    if kind == "local":
        rows = {}
        for index, name in enumerate(hospitals):
            model = train_rounds(
                cfg, training_tensors(cfg, [name]), index, f"local_only {name}", name
            )
            path = save_model(
                model.state_dict(),
                cfg,
                int(cfg.federation.rounds),
                train_dir / name / "final_model.pt",
            )
            rows[f"{run.regime.name} ({name})"] = dict.fromkeys(hospitals, path)
        return rows
    if kind == "centralized":
        if cfg.model.get("per_hospital"):
            raise JobError(
                "regime=centralized pools every hospital's images into one model input, so it "
                "cannot give each its own model.per_hospital standardisation; drop it there"
            )
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
            model, payload = load_model(global_model, list(cfg.data.classes), hospital=name)
            fine_tune_at(cfg, run.regime, model, training_tensors(cfg, [name]), index, name)
            own[name] = save_model(
                model.state_dict(),
                cfg,
                int(cfg.federation.rounds),
                train_dir / name / "final_model.pt",
                payload.get("splits"),
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
        model, loss = train_supervised_ceiling(pp_cfg, name, run.out / "train" / name)
        cells = {
            column: score_segmenter(
                model, pp_cfg, column, run.out / "eval" / row_folder(row) / column
            )
            for column in run.hospitals
        }
        rows.append(
            {
                "row": row,
                "folder": row_folder(row),
                "trained_at": name,
                "cells": cells,
                "train_loss": round(loss, 4),
            }
        )
    return rows


def finished_results(out: Path) -> dict[str, Any] | None:
    """A run folder's ``results.json`` when the run finished, else ``None`` (redo it).

    ``results.json`` is written last and atomically, so its presence means every model and
    score before it is on disk; an unreadable one (a disk that filled up) counts as unfinished.
    """
    try:
        return json.loads((out / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_config(run: SeedRun) -> dict[str, Any]:
    """What a finished run was made with: its training config, regime, post-training overrides."""
    return {
        "training": comparable(run.cfg),
        "regime": OmegaConf.to_container(run.regime, resolve=True),
        "postprocess": list(run.postprocess_overrides),
    }


# What differs between the runs of one label by design.
PER_RUN_KEYS = ("seed", "data.split.fold")


def same_overrides(overrides: Sequence[str], skipped: Sequence[str]) -> list[str]:
    """Overrides in an order of their own: the last of each key (as Hydra takes it), sorted.

    The same settings typed in another order on the command line are the same job.
    """
    last = {override_key(o): o for o in overrides if override_key(o) not in skipped}
    return sorted(last.values())


def check_same_config(
    run: SeedRun, finished: dict[str, Any], where: Path | None = None, per_run: bool = False
) -> None:
    """Refuse to keep a finished run that another config made: the rerun would mix the two.

    ``where`` is the finished run's folder when it is not ``run``'s own: another seed or fold
    of the same label, which the report pools with this one, so it must differ only in
    :data:`PER_RUN_KEYS` (``per_run``).

    Raises
    ------
    JobError
        Naming the run folder and the first settings that differ.
    """
    before = finished.get("config")
    if before is None:
        return  # runs written before configs were recorded cannot be checked
    skipped = PER_RUN_KEYS if per_run else ()
    old, new = (
        {
            **_flat(c["training"]),
            # Runs recorded before the regime was cannot be checked on it.
            **(_flat(c["regime"], "regime.") if "regime" in before else {}),
            "postprocess": same_overrides(c["postprocess"], skipped),
        }
        for c in (before, run_config(run))
    )
    for key in skipped:
        old.pop(key, None)
        new.pop(key, None)
    if not (changed := config_changes(old, new)):
        return
    raise JobError(
        f"{where or run.out} finished with another config ({', '.join(changed[:4])} differ); "
        "give this config its own label=... or runs_dir=..., or delete that folder to redo it"
    )


def check_label_config(runs: list[SeedRun], label_dir: Path) -> None:
    """Refuse a rerun, or new seeds or folds, under a label whose finished runs another config made.

    Every finished run is checked before anything runs or is written: a refusal found on the
    way would leave the runs before it made with the new config, pooled into the label's row
    with the old ones, and ``experiment.yaml`` naming the new config.
    """
    planned = {run.out: run for run in runs}
    for results in sorted(label_dir.glob(f"**/{RESULTS}")):
        if (done := finished_results(results.parent)) is None:
            continue
        if (own := planned.get(results.parent)) is not None:
            check_same_config(own, done)
        else:
            check_same_config(runs[0], done, results.parent, per_run=True)


def config_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose setting differs between an earlier run's flat config and this one's.

    A key the earlier config lacks counts as unchanged when this config holds its default:
    settings are added with defaults that keep the earlier behaviour, so a run made before a
    key existed was made with that default, and adding a key must not orphan finished runs.
    A hospital is data, not a setting added later: one that only one config has (removed with
    ``~data.hospitals.<name>``, all its keys at their defaults in the other) changes
    ``data.hospitals``.
    """
    defaults = default_settings()
    changed = {
        key
        for key in before.keys() | now.keys()
        if before.get(key, defaults.get(key, _ABSENT)) != now.get(key, _ABSENT)
    }
    if hospitals_of(before) != hospitals_of(now):
        changed.add(HOSPITALS)
    return sorted(changed)


def hospitals_of(flat: dict[str, Any]) -> set[str]:
    """The hospital names of a flat config: ``data.hospitals.hospital_a.seed`` -> ``hospital_a``."""
    prefix = f"{HOSPITALS}."
    return {key[len(prefix) :].split(".", 1)[0] for key in flat if key.startswith(prefix)}


@functools.cache
def default_settings() -> dict[str, Any]:
    """Every training setting's default, flat: what a key added later stood for before."""
    return _flat(comparable(compose_config([])))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested settings as dotted keys."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) else prefix + key))
    return flat


def clear_unfinished(out: Path) -> None:
    """Remove what a half-finished run left, but a federated model it finished training.

    A run is redone whole and never mixes two runs' files, except that a run stopped while
    scoring keeps ``train/global`` once its ``final_model.pt`` exists (a fresh training there
    removes it first): :meth:`SeedRun.federated` reuses it when its config still matches,
    instead of training it again.
    """
    kept = out / "train" / "global"
    if not (kept / "final_model.pt").is_file():
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in [*out.iterdir(), *kept.parent.iterdir()]:
        if entry in (kept, kept.parent):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def run_seed(run: SeedRun) -> dict[str, Any]:
    """Train and score one seed (and fold); return (and write) its ``results.json``."""
    clear_unfinished(run.out)
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
        "fold": run.fold,
        "seed": run.seed,
        "hospitals": run.hospitals,
        "rows": rows,
        "metrics_jsonl": str(metrics.relative_to(run.out)) if metrics.exists() else None,
        "seconds": round(time.perf_counter() - started, 1),
        "config": run_config(run),
    }
    write_text_atomically(run.out / RESULTS, json.dumps(results, indent=2) + "\n")
    return results


def experiment_folds(cfg: DictConfig) -> list[int | None]:
    """The folds to run: ``[None]`` (the fixed split) unless ``folds`` lists fold indices.

    K-fold splits without ``folds`` are refused: the runs would be recorded as the fixed split
    (``fold: null``), and w3s-report would pair runs of different test folds as one.
    """
    if cfg.folds is None or (OmegaConf.is_list(cfg.folds) and len(cfg.folds) == 0):
        if cfg.data.split.get("folds") is not None:
            raise JobError(
                f"data.split.folds={cfg.data.split.folds} needs folds=[...], the folds to run "
                "(each run sets its own data.split.fold), e.g. folds=[0,1,2]"
            )
        return [None]
    folds = whole_numbers(cfg, "folds")
    if cfg.data.split.get("folds") is None:
        raise JobError(f"folds={folds} needs data.split.folds=K (K-fold splits, K >= 3)")
    count = int(number_setting(cfg, "data.split.folds", whole=True))
    if bad := [f for f in folds if not 0 <= f < count]:
        raise JobError(f"folds {bad} are not in 0..{count - 1} (data.split.folds={count})")
    return folds


def whole_numbers(cfg: DictConfig, key: str) -> list[int]:
    """The whole numbers >= 0 that the list ``cfg[key]`` holds, or a one-line refusal.

    Hydra keeps ``seeds=abc`` a string and ``seeds=0`` a number, and iterating over either
    deep in the job ended in a traceback (or, for an empty list, in a run that did nothing).
    """
    value = OmegaConf.select(cfg, key)
    items = list(value) if OmegaConf.is_list(value) else []
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in items):
        raise JobError(f"{key}={value}: expected a list of whole numbers >= 0, e.g. {key}=[0,1,2]")
    return items


def planned_runs(
    cfg: DictConfig, training: list[str], shared: list[str], runs_dir: Path
) -> list[SeedRun]:
    """Every (fold, seed) run of the regime, each with its own training and post-training config.

    A fold's split override goes to both configs, so the post-training job scores the model on
    the test fold it was not trained on.
    """
    runs = []
    for fold in experiment_folds(cfg):
        split = fold_overrides(fold)
        postprocess = [*shared, *split, *(str(o) for o in cfg.postprocess)]
        for seed in cfg.seeds:
            seed_cfg = compose_config([*training, *split, f"seed={seed}"])
            runs.append(
                SeedRun(
                    seed_cfg,
                    cfg.regime,
                    str(cfg.label),
                    [*training, *split],
                    postprocess,
                    int(seed),
                    runs_dir,
                    fold,
                )
            )
    return runs


def check_experiment_values(cfg: DictConfig) -> None:
    """Refuse bad seeds or label, a regime value or a non-list ``postprocess``, before any run.

    The training would fail on some, the first scoring on others, hours in; a label such as
    ``a/b`` or ``..`` wrote runs where ``w3s-report`` never looks.

    Raises
    ------
    JobError
        Naming the key and its value.
    """
    whole_numbers(cfg, "seeds")
    label = str(cfg.label)
    if not label or label in (".", "..") or "/" in label or "\\" in label:
        raise JobError(
            f"label={label}: expected a folder name of its own under runs_dir (w3s-report finds "
            "a label's runs at <runs_dir>/<label>/)"
        )
    if not OmegaConf.is_list(cfg.postprocess):
        raise JobError(
            f"postprocess={cfg.postprocess}: expected a list of overrides of the post-training "
            "job, e.g. postprocess=[segmenter.epochs=3]"
        )
    if number_setting(cfg, "regime.proximal_mu") < 0:
        raise JobError(f"regime.proximal_mu={cfg.regime.proximal_mu}: expected a number >= 0")
    if str(cfg.regime.kind) != "personalized":
        return
    if number_setting(cfg, "regime.finetune_epochs", whole=True) < 0:
        raise JobError(f"regime.finetune_epochs={cfg.regime.finetune_epochs}: expected >= 0")
    if not number_setting(cfg, "regime.finetune_lr_scale") > 0:
        raise JobError(f"regime.finetune_lr_scale={cfg.regime.finetune_lr_scale}: expected > 0")


def check_postprocess_overrides(run: SeedRun) -> None:
    """Compose and check the post-training job at every hospital before any training.

    A mistyped ``postprocess=[...]`` override would otherwise end the first scoring, after the
    training, in a traceback. The checkpoint is left out: the training makes it.

    Raises
    ------
    JobError
        Naming the override or setting that is wrong.
    """
    for hospital in run.hospitals:
        overrides = [*run.postprocess_overrides, f"hospital={hospital}"]
        compose_checked(overrides, "postprocess", check_postprocess_settings)


def check_postprocess_fits_model(run: SeedRun) -> None:
    """Refuse post-training settings that the model to be trained cannot serve, before training.

    A model without the foreground head (``experiment=paper``) would otherwise train for hours
    and then fail in its first post-training job.
    """
    if run.regime.kind == "supervised" or run.cfg.model.get("foreground_head"):
        return
    needs = foreground_head_settings(
        compose_config(run.postprocess_overrides, config_name="postprocess")
    )
    if needs:
        raise JobError(
            f"model.foreground_head=false, but the post-training settings {', '.join(needs)} "
            "need the head; add 'postprocess=[localization=fused,personalize.epochs=0]'"
        )


def write_experiment_file(path: Path, overrides: Sequence[str], cfg: DictConfig) -> None:
    """The label's config, under a comment line for every command that ran under it.

    New seeds or folds join a label by another call: keeping only the last command would show
    a report's reader a command that never ran the runs it pools.
    """
    try:
        earlier = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        earlier = []
    commands = [line for line in earlier if line.startswith(COMMAND_LINE)]
    lines = dict.fromkeys([*commands, COMMAND_LINE + shlex.join(overrides)])
    write_text_atomically(path, "\n".join(lines) + "\n" + OmegaConf.to_yaml(cfg))


def run_experiment(cfg: DictConfig, overrides: list[str]) -> int:
    """One regime, every fold and seed, end to end; runs finished by an earlier call are kept."""
    typed = list(overrides)  # as the user gave them, before the paths are pinned
    overrides = [*overrides, *launch.absolute_path_overrides(cfg, Path.cwd())]
    if any(override_key(o) == "seed" for o in overrides):
        raise JobError("seed= is set per run by w3s-experiment: give the seeds as seeds=[...]")
    cfg = compose_config(overrides, config_name=CONFIG_NAME)
    check_experiment_values(cfg)
    experiment_folds(cfg)  # a wrong fold list or value fails before the data is read
    if problems := verify_data(cfg.data):
        raise DataVerificationError(problems)
    training = [o for o in overrides if override_key(o).split(".")[0] not in EXPERIMENT_KEYS]
    per_hospital = cfg.train.get("per_hospital") or {}
    own_mu = [
        f"train.per_hospital.{h}" for h, own in per_hospital.items() if "proximal_mu" in (own or {})
    ]
    if any(override_key(o) == "train.proximal_mu" for o in training) or own_mu:
        # It would train FedProx under regime=fedavg (at one hospital, or all), and
        # results.json would record the regime's value, not the one trained with.
        raise JobError(
            f"{(own_mu or ['train'])[0]}.proximal_mu: the regime's setting in w3s-experiment: "
            "give regime.proximal_mu=<mu> (regime=fedprox)"
        )
    training.append(f"train.proximal_mu={cfg.regime.proximal_mu}")
    shared = [o for o in training if override_key(o).split(".")[0] in SHARED_WITH_POSTPROCESS]
    runs_dir = Path(str(cfg.runs_dir)).expanduser().resolve()
    runs = planned_runs(cfg, training, shared, runs_dir)
    if runs:  # the runs differ only in split and seed
        launch.check_training_config(runs[0].cfg)
        check_postprocess_overrides(runs[0])
        check_postprocess_fits_model(runs[0])
    out = runs_dir / str(cfg.label)
    if runs:
        check_label_config(runs, out)
    out.mkdir(parents=True, exist_ok=True)
    write_experiment_file(out / "experiment.yaml", typed, cfg)
    for run in runs:
        if (done := finished_results(run.out)) is not None:
            log.info("%s: skipped, finished before in %.0fs", run.out, done.get("seconds", 0))
            continue
        results = run_seed(run)
        log.info("%s done in %.0fs", run.out, results["seconds"])
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
        "folds": "cross-validation folds to run, e.g. [0,1,2,3,4] with data.split.folds=5",
        "runs_dir": "parent folder of every regime's runs",
        "label": "folder name of this regime's runs (default: the regime's name)",
        "postprocess": "overrides of the post-training job, e.g. [segmenter.epochs=3]",
    },
    examples=[
        "w3s-experiment regime=fedavg data=wbc_zxaoyou seeds=[0,1,2] runs_dir=runs/wbc",
        "w3s-experiment regime=fedavg folds=[0,1,2,3,4] data.split.folds=5 runs_dir=runs/cv",
    ],
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-experiment``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
