"""Does a training lever make the model localize? Train once, score the maps on validation.

One call trains the federation exactly as a user would (``w3s-simulate``, so the ServerApp and
ClientApp run every phase) with the given Hydra overrides and seed, then scores, per hospital:

- the ``maps`` row of ``w3s-postprocess`` (the model's maps against one background constant
  chosen on validation; no colour growth, border background or centre pick), binary mIoU %;
- the centred disk (radius chosen on validation), the reference the maps must beat;
- the validation accuracy of both classifiers (class tokens, patch-CAM head) after the last round;
- ``val-loc-miou`` per round, from the run's ``metrics.jsonl``, and its trend after round 5.

The scores come from the post-training code itself (``post_training.stages``): the numbers
``w3s-postprocess personalize.epochs=0`` would print. They score the federation's model, the
one a lever trains, before any site's fine-tune (which the job keeps where its maps score
better on validation). Test scores are printed only with ``--test``: levers
are compared on validation, and the test split is looked at once, at the end.

Run from the repository root, under ``nice`` on a shared machine::

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python -m benchmarks.localization_levers
        --name contrast --seed 0 -- data=wbc_zxaoyou federation.rounds=30 train.local_epochs=2
        model.foreground_head=true localization.source=foreground
        train.levers.foreground.contrast=1

(one command line).

Each call trains into ``--root`` (default ``outputs/levers/runs``, git-ignored) and appends one
JSON line to ``--results`` (default ``outputs/levers/results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.checkpoint import load_model
from common.config import compose_config
from common.data import hospital_names
from common.training import resolve_device
from post_training.stages import Evaluation, disk_stage, make_maps, seeds_stage
from server_app.recorder import phase_of

SIMULATE = Path(sys.executable).with_name("w3s-simulate")


def train(run_dir: Path, seed: int, overrides: Sequence[str]) -> float:
    """Run ``w3s-simulate`` into ``run_dir``; return its wall-clock minutes."""
    command = [str(SIMULATE), *overrides, f"seed={seed}", f"output_dir={run_dir}"]
    # Its own FLWR_HOME, so that the run's SuperLink log stays apart (w3s-simulate gives each
    # run its own SuperLink ports).
    env = {**os.environ, "FLWR_HOME": tempfile.mkdtemp(prefix="flwr_home_")}
    started = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w", encoding="utf-8") as log_file:
        done = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    minutes = (time.perf_counter() - started) / 60
    if done.returncode != 0:
        # The run's final status query can miss a SuperLink that already stopped; the run
        # itself is judged by its outputs.
        if not (run_dir / "final_model.pt").is_file():
            raise RuntimeError(f"training failed; see {run_dir.with_suffix('.log')}")
        print(f"note: w3s-simulate exited {done.returncode} but wrote final_model.pt")
    return minutes


def round_metrics(run_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Per hospital: ``val-loc-miou`` and both accuracies of every MCT round, in order.

    Runs from before ``val-cam-accuracy`` existed have an empty list for it.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if phase_of(row) != "mct":
            continue
        for name, metrics in row.get("hospitals", {}).items():
            per = out.setdefault(
                name, {"val-loc-miou": [], "val-accuracy": [], "val-cam-accuracy": []}
            )
            for key in per:
                if key in metrics:  # null: a score its split left undefined
                    per[key].append(math.nan if metrics[key] is None else float(metrics[key]))
    return out


def trend_after(values: Sequence[float], first_round: int = 5) -> float:
    """Least-squares slope of a per-round series from ``first_round`` on, per 10 rounds."""
    tail = np.asarray(values[first_round - 1 :], dtype=float)
    if len(tail) < 2:
        return float("nan")
    return float(np.polyfit(np.arange(len(tail)), tail, 1)[0] * 10)


def scoring_overrides(overrides: Sequence[str]) -> list[str]:
    """What the post-training job shares with training: the data and how maps are made.

    Added (``+``) and removed (``~``) keys count too: a hospital added for the run is scored.
    """
    return [o for o in overrides if o.lstrip("+~").startswith(("data", "localization"))]


def score_maps(run_dir: Path, hospital: str, data_overrides: Sequence[str]) -> dict[str, Any]:
    """The ``maps`` and disk rows of ``w3s-postprocess`` for one hospital (binary mIoU %)."""
    cfg = compose_config(
        [
            *data_overrides,
            f"checkpoint={run_dir / 'final_model.pt'}",
            f"hospital={hospital}",
            "device=cpu",
        ],
        config_name="postprocess",
    )
    model, _ = load_model(cfg.checkpoint, list(cfg.data.classes), cfg.localization.source, hospital)
    splits = make_maps(model, cfg, hospital, resolve_device(cfg.device))
    evaluation = Evaluation(splits, len(cfg.data.classes) + 1, cfg.evaluation)
    maps, _ = seeds_stage(splits, evaluation, int(cfg.batch_size))
    disk = disk_stage(splits, evaluation)
    return {
        "threshold": maps.choice["background"],
        **{
            f"{key}_{split}": round(100 * stage.scores[split].binary_miou, 1)
            for key, stage in (("maps", maps), ("disk", disk))
            for split in stage.scores
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="lever name, also the run folder's prefix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=Path("outputs/levers/runs"))
    parser.add_argument("--results", type=Path, default=Path("outputs/levers/results.jsonl"))
    parser.add_argument("--skip-train", action="store_true", help="score an existing run")
    parser.add_argument("--test", action="store_true", help="also print the test split")
    parser.add_argument(
        "--post", nargs="*", default=[], help="extra w3s-postprocess overrides for the scoring"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of w3s-simulate")
    args = parser.parse_args(argv)

    # The ServerApp refuses a relative output_dir (its working directory is the SuperLink's).
    run_dir = args.root.resolve() / f"{args.name}_s{args.seed}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    minutes = float("nan") if args.skip_train else train(run_dir, args.seed, args.overrides)
    train_cfg = compose_config(args.overrides)
    if int(train_cfg.data.split.seed) != 0:
        print(f"warning: data.split.seed={train_cfg.data.split.seed}, not the fixed split 0")
    data_overrides = scoring_overrides(args.overrides)
    rounds = round_metrics(run_dir)
    row: dict[str, Any] = {
        "name": args.name,
        "seed": args.seed,
        "overrides": list(args.overrides),
        "post": list(args.post),
        "train_minutes": round(minutes, 2),
        "hospitals": {},
    }
    for hospital in hospital_names(train_cfg.data):
        scores = score_maps(run_dir, hospital, [*data_overrides, *args.post])
        if not args.test:
            scores = {k: v for k, v in scores.items() if not k.endswith("_test")}
        loc = rounds[hospital]["val-loc-miou"]
        row["hospitals"][hospital] = {
            **scores,
            "accuracy_val": round(rounds[hospital]["val-accuracy"][-1], 3),
            "cam_accuracy_val": (
                round(cam[-1], 3) if (cam := rounds[hospital]["val-cam-accuracy"]) else None
            ),
            "loc_first_last": [round(loc[0], 3), round(loc[-1], 3)],
            "loc_max": round(max(loc), 3),
            "loc_slope_after_r5_per10": round(trend_after(loc), 3),
            "loc_per_round": [round(v, 3) for v in loc],
        }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
    brief = {
        h: {k: v for k, v in s.items() if k != "loc_per_round"} for h, s in row["hospitals"].items()
    }
    print(json.dumps({**row, "hospitals": brief}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
