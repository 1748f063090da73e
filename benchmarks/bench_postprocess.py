"""Speed of the post-training job: maps vs a bare forward, random walks, segmenter inference.

Map generation (attention weights, fusion, refinement, upsampling to the native image size,
label masking, min-max) should keep at least 0.7x the images/s of a bare forward pass of the same
model at one scale without flips. The two are timed alternately in one process, so load from
other processes hits both alike. Prints one markdown table.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_postprocess
    .venv/bin/python -m benchmarks.bench_postprocess --preset deit_small --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import timm
import torch

from benchmarks.bench_model_step import PRESETS, cpu_model
from common.augment import normalise
from common.localization import MapSettings, batch_maps
from common.pseudo import AttentionWalkMasker, MapRecord
from common.pseudo.walk import transition_matrix, walk_on_grid
from common.segmenter import create_segmenter, predict


def best_medians(fns: Sequence[Callable[[], object]], repeats: int, rounds: int) -> list[float]:
    """Per function, the smallest over ``rounds`` of its median time over ``repeats`` calls.

    The functions are called in turn within each repeat (after one warm-up call each), so a
    burst of load from other processes slows them alike instead of biasing their ratio.
    """
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for index, fn in enumerate(fns):
                start = time.perf_counter()
                fn()
                times[index].append(time.perf_counter() - start)
        best = [min(b, statistics.median(t)) for b, t in zip(best, times, strict=True)]
    return best


def map_throughput(
    model: torch.nn.Module,
    batch: int,
    native: int,
    settings: Sequence[MapSettings],
    repeats: int,
    rounds: int,
) -> list[float]:
    """Images/s of a bare forward, then of map generation with each settings, on one batch."""
    side = settings[0].side(model, 1.0)
    images = normalise(torch.randint(0, 255, (batch, 3, side, side), dtype=torch.uint8))
    labels = torch.arange(batch) % model.num_classes
    present = torch.nn.functional.one_hot(labels, model.num_classes).float()
    sizes = [(native, native)] * batch
    runs: list[Callable[[], object]] = [partial(model, images)]
    runs += [partial(batch_maps, model, images, present, sizes, s) for s in settings]
    with torch.no_grad():
        return [batch / seconds for seconds in best_medians(runs, repeats, rounds)]


def walk_seconds(nodes_side: int, logt: int, native: int, classes: int, repeats: int) -> float:
    """Seconds per image of one walk: transition matrix to 2^logt, pool, walk, upsample."""
    grid = (nodes_side, nodes_side)
    affinity = torch.rand(nodes_side**2, nodes_side**2)
    affinity = (affinity + affinity.T) / 2
    scores = torch.rand(classes + 1, native, native)

    def walk() -> torch.Tensor:
        return walk_on_grid(scores, transition_matrix(affinity, 8, logt), grid, (native, native))

    return best_medians([walk], repeats, 1)[0]


def attn_rw_seconds(model: torch.nn.Module, native: int, batch: int, repeats: int) -> float:
    """Seconds per image of the default ``attn_rw`` pseudo-masks, batched as the job does."""
    grid = model.grid_size
    nodes = grid[0] * grid[1]
    rng = np.random.default_rng(0)
    records = [
        MapRecord(
            rng.integers(0, 255, (native, native, 3), dtype=np.uint8),
            0,
            torch.rand(model.num_classes, native, native),
            torch.rand(nodes, nodes),
            grid,
        )
        for _ in range(batch)
    ]
    masker = AttentionWalkMasker(beta=8, logt=2)
    scores = [r.maps for r in records]
    return best_medians([partial(masker.propagate, records, scores)], repeats, 1)[0] / batch


def segmenter_throughput(
    arch: str, input_size: int, native: int, batch: int, repeats: int
) -> float:
    """Images/s of ``predict`` (resize, forward, upsample to native size, argmax)."""
    model = create_segmenter({"arch": arch}, 6).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (native, native, 3), dtype=np.uint8) for _ in range(batch)]
    run = partial(predict, model, images, input_size, device=torch.device("cpu"), batch_size=batch)
    return batch / best_medians([run], repeats, 1)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--native", type=int, default=120, help="native image side (Dataset 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--segmenter", default="deeplabv3_mobilenet_v3_large")
    parser.add_argument("--segmenter-size", type=int, default=128)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    model = timm.create_model(PRESETS[args.preset], num_classes=5).eval()
    single = MapSettings(scales=(1.0,), hflip=False)
    bare, maps, maps_flip = map_throughput(
        model, args.batch, args.native, [single, MapSettings()], args.repeats, args.rounds
    )
    grid = model.grid_size[0]
    segmenter = segmenter_throughput(
        args.segmenter, args.segmenter_size, args.native, 16, args.repeats
    )
    rows = [
        ("bare forward (images/s)", f"{bare:.1f}"),
        ("maps, 1 scale, no flip (images/s)", f"{maps:.1f}"),
        ("maps / bare forward", f"{maps / bare:.2f} (target >= 0.70)"),
        ("fused maps, 1 scale + horizontal flip (images/s)", f"{maps_flip:.1f}"),
        (
            f"attn_rw pseudo-mask, {grid}x{grid} grid, t=4 (ms/image)",
            f"{1000 * attn_rw_seconds(model, args.native, args.batch, args.repeats):.1f}",
        ),
        (
            "PSA walk, 12x12 grid (96 px), t=256 (ms/image)",
            f"{1000 * walk_seconds(12, 8, args.native, 5, args.repeats):.1f}",
        ),
        (
            "PSA walk, 28x28 grid (224 px), t=256 (ms/image)",
            f"{1000 * walk_seconds(28, 8, args.native, 5, args.repeats):.1f}",
        ),
        (
            f"segmenter {args.segmenter} @ {args.segmenter_size} px (images/s)",
            f"{segmenter:.1f}",
        ),
    ]
    machine = (
        f"torch {torch.__version__}, {args.threads} threads, {cpu_model()}, "
        f"load average {load:.1f} at start"
    )
    print(
        f"preset {args.preset} ({model.img_size} px, patch {model.patch_size}), "
        f"batch {args.batch}, native images {args.native} px; {machine}\n"
    )
    print("| measure | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
