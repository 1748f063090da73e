"""Wall time of ``w3s-postprocess`` per hospital, and where it goes (the job's phase profile).

Runs the real job as a subprocess per hospital: side by side with one thread each (how two
sites' worth of work shares this 2-core machine) or one after another with ``--threads 2``.
Every extra argument is a Hydra override of the job, e.g. a cheaper segmenter to time the rest.
``--code`` runs another checkout of the project (its commit's job), for a before/after table.
``--train`` first trains the model with ``w3s-simulate`` (its overrides in one string) and
times it, so one command measures the whole real-data pipeline, training included.

Run from the repository root::

    .venv/bin/python -m benchmarks.postprocess_pipeline --checkpoint <run>/final_model.pt
        --hospitals dataset1 dataset2 --threads 1 data=wbc_zxaoyou   (one line)
    .venv/bin/python -m benchmarks.postprocess_pipeline --hospitals dataset1 dataset2
        --train "data=wbc_zxaoyou federation.rounds=30 train.local_epochs=2" data=wbc_zxaoyou
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_job(
    code: Path, checkpoint: Path, hospital: str, out: Path, threads: int, overrides: list[str]
) -> subprocess.Popen:
    """Start the job of the checkout ``code`` for one hospital."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code)}
    module = (
        "post_training.postprocess"
        if (code / "post_training").is_dir()
        else "common.jobs.postprocess"  # the layout before post_training/ existed
    )
    command = [
        sys.executable,
        "-m",
        module,
        f"checkpoint={checkpoint}",
        f"hospital={hospital}",
        f"output_dir={out}",
        *overrides,
    ]
    log = (out.parent / f"{hospital}.log").open("w")
    return subprocess.Popen(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)


def train_model(code: Path, out: Path, overrides: str) -> tuple[Path, float]:
    """Run ``w3s-simulate`` of the checkout into ``out``; its final model and wall seconds."""
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "FLWR_HOME": str(out / "flwr"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    command = [sys.executable, "-m", "server_app.launch", f"output_root={out}", *overrides.split()]
    started = time.perf_counter()
    with (out / "training.log").open("w") as log:
        done = subprocess.run(command, cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = round(time.perf_counter() - started, 1)
    models = sorted(out.glob("*/final_model.pt"))
    if done.returncode != 0 or len(models) != 1:
        raise SystemExit(f"training failed; see {out / 'training.log'}")
    return models[0], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a trained model file")
    source.add_argument("--train", metavar="OVERRIDES", help="w3s-simulate overrides, one string")
    parser.add_argument("--hospitals", nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1, help="1: side by side; else in turn")
    parser.add_argument("--code", type=Path, default=Path.cwd(), help="checkout to run")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of w3s-postprocess")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="postprocess-bench-"))
    code = args.code.resolve()
    wall: dict[str, float] = {}
    if args.train is None:
        checkpoint = args.checkpoint.resolve()
    else:
        checkpoint, wall["training"] = train_model(code, out, args.train)
    started_all = time.perf_counter()
    running = {}
    for hospital in args.hospitals:
        running[hospital] = (
            run_job(code, checkpoint, hospital, out / hospital, args.threads, args.overrides),
            time.perf_counter(),
        )
        while running and (args.threads > 1 or hospital == args.hospitals[-1]):
            for name, (process, started) in list(running.items()):
                if process.poll() is not None:
                    wall[name] = round(time.perf_counter() - started, 1)
                    del running[name]
                    if process.returncode != 0:
                        raise SystemExit(f"{name} failed; see {out / f'{name}.log'}")
            time.sleep(0.2)
    post_training = round(time.perf_counter() - started_all, 1)
    results: dict[str, object] = {"post_training_wall_s": post_training}
    if "training" in wall:
        results["training_wall_s"] = wall["training"]
        results["total_wall_s"] = round(wall["training"] + post_training, 1)
    for hospital in args.hospitals:
        metrics = json.loads((out / hospital / "metrics.json").read_text())
        results[hospital] = {"wall_s": wall[hospital], "phases_s": metrics.get("seconds")}
    print(json.dumps({"threads": args.threads, "overrides": args.overrides, **results}))


if __name__ == "__main__":
    main()
