"""Flower's added cost per round: a real ``w3s-simulate`` run vs the same work in one process.

Both sides run the same ``train_local`` / ``evaluate_local`` on the same hospitals, rounds and
seeds; the in-process side averages with the same ``weighted_average``. Reports the per-round
times, Flower's overhead per round, its fixed start-up cost, and each client's peak RSS.

    python -m benchmarks.bench_federated_round --rounds 3 [hydra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import MetricRecord, RecordDict

from common.arrays import array_specs, to_array_record, to_state_dict, weighted_average
from common.augment import train_cache_size
from common.config import compose_config
from common.data import hospital_names, split_tensors
from common.model import create_mct_model
from common.pretrain import pretrain_round
from common.training import evaluate_local, resolve_device, train_round
from support.flower_processes import BIN, flower_env, stop_processes


@dataclass(frozen=True)
class RoundTiming:
    """One in-process round: its wall time and the training share of it."""

    seconds: float
    train_seconds: float
    train_images: int  # images stepped on, summed over hospitals and local epochs


def in_process(
    overrides: list[str],
    rounds: int,
    phase: str = "mct",
    initial: dict[str, torch.Tensor] | None = None,
) -> tuple[list[RoundTiming], dict[str, torch.Tensor]]:
    """The same federated work without Flower, timed per round; also the final global weights.

    ``phase`` is ``mct`` (train_round, then validation at every hospital, as the MCT rounds) or
    ``pretrain`` (pretrain_round, each hospital keeping its head, no validation). ``initial``
    replaces the seeded initial weights, so that the MCT rounds can start from the pretraining.
    """
    rounds_key = "pretrain.rounds" if phase == "pretrain" else "federation.rounds"
    cfg = compose_config([*overrides, f"{rounds_key}={rounds}"])
    names = hospital_names(cfg.data)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    global_arrays = to_array_record(initial if initial is not None else model.state_dict())
    # Each hospital's own model, as its ClientApp builds it (model.per_hospital standardisation).
    models = {
        name: create_mct_model(
            cfg.model, len(cfg.data.classes), hospital=name, load_pretrained=False
        )
        for name in names
    }
    heads: dict[str, dict[str, torch.Tensor]] = {}
    timings = []
    for server_round in range(1, rounds + 1):
        started = time.perf_counter()
        replies = []
        train_seconds, train_images = 0.0, 0
        for index, name in enumerate(names):
            model = models[name]
            model.load_state_dict(to_state_dict(global_arrays))
            data = split_tensors(cfg.data, name, "train", train_cache_size(cfg.model.img_size))
            where = {"server_round": server_round, "hospital_index": index, "device": device}
            if phase == "pretrain":
                result, heads[name] = pretrain_round(model, data, cfg, heads.get(name), **where)
            else:
                result = train_round(model, data, cfg, hospital=name, **where)
            train_seconds += result.seconds
            train_images += result.images
            replies.append(
                RecordDict(
                    {
                        "arrays": to_array_record(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": result.num_examples}),
                    }
                )
            )
        global_arrays = weighted_average(replies, array_specs(global_arrays))
        if phase == "mct":
            for name in names:
                models[name].load_state_dict(to_state_dict(global_arrays))
                val = split_tensors(cfg.data, name, "val", cfg.model.img_size)
                evaluate_local(models[name], val, cfg.localization, device=device)
        timings.append(RoundTiming(time.perf_counter() - started, train_seconds, train_images))
    return timings, to_state_dict(global_arrays)


def through_flower(overrides: list[str], rounds: int) -> tuple[float, list[dict]]:
    """Wall time of a real ``w3s-simulate`` run and its per-round metrics rows."""
    with tempfile.TemporaryDirectory(prefix="w3s-bench-") as tmp:
        home = Path(tmp) / "flwr_home"
        home.mkdir()
        run_dir = Path(tmp) / "run"
        command = [
            str(BIN / "w3s-simulate"),
            *overrides,
            f"federation.rounds={rounds}",
            f"output_dir={run_dir}",
        ]
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, env=flower_env(home), capture_output=True, text=True, check=False
            )
        finally:
            stop_processes(str(home))
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads of the in-process loop (Flower runs 2 one-thread clients on 2 cores)",
    )
    args, extra = parser.parse_known_args()
    # The MCT rounds only: the Flower run would otherwise add its pretraining rounds.
    overrides = ["pretrain=none", *extra]
    torch.set_num_threads(args.threads)
    plain = [t.seconds for t in in_process(overrides, args.rounds)[0]]
    wall, rows = through_flower(overrides, args.rounds)
    flower = [r["seconds"] for r in rows]
    # Round 1 carries the clients' one-off imports and data loading; steady rounds follow.
    steady_plain = statistics.median(plain[1:] or plain)
    steady_flower = statistics.median(flower[1:] or flower)
    overhead = steady_flower - steady_plain
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"config: {' '.join(overrides) or '(default)'}, rounds {args.rounds}, "
        f"in-process threads {args.threads}"
    )
    print("| | round 1 s | steady round s (median of rounds 2..) |")
    print("|---|---|---|")
    print(f"| in-process loop | {plain[0]:.1f} | {steady_plain:.1f} |")
    print(f"| Flower simulation | {flower[0]:.1f} | {steady_flower:.1f} |")
    print(
        f"Flower overhead per steady round: {overhead:.1f} s = "
        f"{100 * overhead / steady_flower:.0f}% of the round"
    )
    print(f"fixed start-up and shut-down (wall - rounds): {wall - sum(flower):.1f} s")
    peaks = {h: m.get("peak-rss-mb") for h, m in rows[-1]["hospitals"].items()}
    print(
        "peak RSS per client process (MB): "
        + ", ".join(f"{h} {v:.0f}" for h, v in peaks.items() if v is not None)
    )


if __name__ == "__main__":
    main()
