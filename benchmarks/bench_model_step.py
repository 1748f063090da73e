"""Train-step cost of MCTFormerV2 against timm's plain ViT of the same size.

The multi-class tokens and the conv CAM head should cost little over a plain ViT; the target is
a median step-time ratio MCT/ViT <= 1.10. Prints one markdown table.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_model_step --preset tiny --batch 32
    .venv/bin/python -m benchmarks.bench_model_step --preset deit_small --batch 8 --steps 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from common.model import MCTFormerV2, mct_loss

PRESETS = {
    "tiny": "mct_tiny_patch8_96",
    "deit_small": "mct_deit_small_patch16_224",
}


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def plain_vit(mct: MCTFormerV2, drop_path_rate: float) -> VisionTransformer:
    block = mct.blocks[0]
    return VisionTransformer(
        img_size=mct.img_size,
        patch_size=mct.patch_size,
        embed_dim=mct.embed_dim,
        depth=len(mct.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / mct.embed_dim,
        qkv_bias=True,
        num_classes=mct.num_classes,
        class_token=True,
        global_pool="token",
        drop_path_rate=drop_path_rate,
    )


def median_step_time(
    model: torch.nn.Module,
    loss_fn: Callable[[object, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    warmup: int,
    amp: bool,
) -> float:
    """Median seconds of one training step; on CUDA each step waits for its kernels.

    ``amp`` steps as ``common.training.train_local`` does on CUDA: fp16 autocast with its
    gradient scaler (scaling, the unscale and the inf check are part of the step).
    """
    model.to(images.device).train()
    sync = torch.cuda.synchronize if images.device.type == "cuda" else lambda: None
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05
    )
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    times = []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(images.device.type, enabled=amp):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--drop-path-rate", type=float, default=0.1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--amp", action="store_true", help="mixed precision as training uses it (CUDA only)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.amp and device.type != "cuda":
        parser.error(f"--amp: training runs mixed precision on CUDA only, not on {device.type}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mct = timm.create_model(
        PRESETS[args.preset], num_classes=args.num_classes, drop_path_rate=args.drop_path_rate
    )
    vit = plain_vit(mct, args.drop_path_rate)
    images = torch.randn(args.batch, 3, mct.img_size, mct.img_size, device=device)
    targets = (torch.rand(args.batch, args.num_classes, device=device) > 0.5).float()

    # Alternate the models over rounds and keep each one's best median, so a burst of load on
    # the machine cannot bias the ratio towards either model.
    runs = {"mct": (mct, mct_loss), "vit": (vit, F.multilabel_soft_margin_loss)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.rounds):
        for name, (model, loss_fn) in runs.items():
            seconds = median_step_time(
                model, loss_fn, images, targets, args.steps, args.warmup, args.amp
            )
            best[name] = min(best[name], seconds)
    mct_s, vit_s = best["mct"], best["vit"]

    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{args.threads} threads, {cpu_model()}"
    )
    machine = f"torch {torch.__version__}, {where}{', autocast' if args.amp else ''}"
    print(
        "| preset | batch | img | MCT step (s) | ViT step (s) | MCT/ViT | MCT images/s "
        "| machine |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    print(
        f"| {args.preset} | {args.batch} | {mct.img_size} | {mct_s:.3f} | {vit_s:.3f} "
        f"| {mct_s / vit_s:.3f} | {args.batch / mct_s:.0f} | {machine} |"
    )


if __name__ == "__main__":
    main()
