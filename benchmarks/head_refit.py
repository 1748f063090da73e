"""Tell whether the shared foreground head or the shared features limit a hospital's maps.

Refits only the foreground head of a trained model at one hospital (the backbone frozen, the
head re-initialised, the foreground contrast on that hospital's training images) and scores the
``maps`` row on validation as ``benchmarks.localization_levers`` does. If a head of the
hospital's own does no better than the shared one, a site-private head (FedBN-style) cannot
help that hospital either: its features are what limit it.

Run from the repository root, on a run of ``benchmarks.localization_levers``::

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.head_refit outputs/levers/runs/contrast_s0
        dataset2 -- data=wbc_zxaoyou

(one command line). The refitted model goes to ``<run>_head_<hospital>/final_model.pt``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchmarks.localization_levers import score_maps, scoring_overrides
from common.augment import train_cache_size
from common.checkpoint import load_model, save_model
from common.config import compose_config
from common.data import split_tensors
from common.levers import contrast_loss
from common.model import MCTFormerV2
from common.training import train_local


def head_contrast(model: MCTFormerV2, images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """The foreground contrast alone: the lever that trains the head in the default recipe."""
    output = model(images)
    return contrast_loss(output.patch_features, torch.sigmoid(output.foreground))


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, parsed intermixed so that ``--test`` may come before the overrides."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a training run folder with final_model.pt")
    parser.add_argument("hospital")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--test", action="store_true", help="also print the test split")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run's data")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)

    cfg = compose_config(list(args.overrides))
    model, payload = load_model(
        args.run / "final_model.pt", list(cfg.data.classes), "foreground", args.hospital
    )
    model.requires_grad_(False)
    model.fg_head.reset_parameters()
    model.fg_head.requires_grad_(True)
    train = OmegaConf.to_container(cfg.train, resolve=True)
    train.update(local_epochs=args.epochs, lr=args.lr, warmup_epochs=0, weight_decay=0.0)
    data = split_tensors(cfg.data, args.hospital, "train", train_cache_size(cfg.model.img_size))
    result = train_local(
        model,
        data,
        train,
        start_epoch=0,
        total_epochs=args.epochs,
        device=torch.device("cpu"),
        seed=0,
        objective=head_contrast,
    )
    out = args.run.with_name(f"{args.run.name}_head_{args.hospital}")
    trained_cfg = OmegaConf.create(payload["config"])
    save_model(
        model.state_dict(),
        trained_cfg,
        int(payload["round"]),
        out / "final_model.pt",
        payload.get("splits"),
    )
    scores = score_maps(out, args.hospital, scoring_overrides(args.overrides))
    if not args.test:
        scores = {k: v for k, v in scores.items() if not k.endswith("_test")}
    row = {"run": str(args.run), "hospital": args.hospital, "loss": result.loss, **scores}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
