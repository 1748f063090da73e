r"""Paper-scale throughput: DeiT-S at 224 px, batch 64, a few FedAvg rounds on the given hospitals.

The rounds run in one process, through the same ``pretrain_round`` / ``train_round``,
``weighted_average`` and ``evaluate_local`` as bench_federated_round's in-process loop, so the
check needs no Ray and runs wherever torch sees an accelerator. Prints one markdown row per
round (seconds, training images per second, the accelerator's peak memory) and writes the
final model, so that ``w3s-postprocess`` can be run on it at the same scale.

    python -m benchmarks.bench_paper_scale --rounds 3 --pretrain-rounds 2 --save /tmp/m.pt \
        data=wbc_zxaoyou device=cuda
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from benchmarks.bench_federated_round import RoundTiming, in_process
from common.checkpoint import save_model
from common.config import compose_config
from common.training import resolve_device

# The paper's recipe, and before it the default masked pretraining phase on the same model.
PAPER = ["experiment=paper"]
PRETRAIN = [*PAPER, "pretrain=masked"]


def accelerator(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or 'CPU'}, {os.cpu_count()} cores"


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak tensor memory since the last reset, where torch tracks it."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def rows(phase: str, timings: list[RoundTiming], peak: float | None) -> list[str]:
    memory = "n/a" if peak is None else f"{peak:.1f}"
    return [
        f"| {phase} | {n} | {t.seconds:.1f} | {t.train_seconds:.1f} | "
        f"{t.train_images / t.train_seconds:.0f} | {memory} |"
        for n, t in enumerate(timings, start=1)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="MCT rounds (experiment=paper)")
    parser.add_argument(
        "--pretrain-rounds", type=int, default=0, help="masked pretraining rounds, DeiT-S"
    )
    parser.add_argument(
        "--pretrain-override",
        action="append",
        default=[],
        help="a Hydra override for the pretraining phase only, e.g. pretrain.local_epochs=1",
    )
    parser.add_argument("--save", type=Path, help="write the final model here")
    args, overrides = parser.parse_known_args()
    cfg = compose_config([*PAPER, *overrides, f"federation.rounds={args.rounds}"])
    device = resolve_device(cfg.device)
    print(f"device: {accelerator(device)}; torch {torch.__version__}")
    print(f"config: {' '.join([*PAPER, *overrides])}")
    print(
        "| phase | round | round s | training s | training images/s | peak accelerator GiB |\n"
        "|---|---|---|---|---|---|"
    )
    initial = None
    if args.pretrain_rounds:
        timings, initial = in_process(
            [*PRETRAIN, *overrides, *args.pretrain_override], args.pretrain_rounds, "pretrain"
        )
        print("\n".join(rows("masked pretraining", timings, peak_memory_gib(device))), flush=True)
    timings, final = in_process([*PAPER, *overrides], args.rounds, "mct", initial)
    print("\n".join(rows("MCT", timings, peak_memory_gib(device))), flush=True)
    if args.save:
        print(f"final model: {save_model(final, cfg, args.rounds, args.save)}")


if __name__ == "__main__":
    main()
