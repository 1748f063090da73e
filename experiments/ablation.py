"""``w3s-ablate``: post-training variants at one hospital, one table row per variant.

``variants`` names ``conf/ablation/<name>.yaml`` (or a YAML file path): a mapping of row title
to a list of Hydra overrides of ``conf/postprocess.yaml`` (a training lever is a variant with
its own ``checkpoint=``). Every other argument is an override applied to all variants. Each
variant runs the whole post-training job into ``<output_dir>/<slug>/``; the table in
``<output_dir>/ablation.md`` gives, per variant, the MCT's classification accuracy, the
segmenter's cell-type accuracy and the binary and class-aware mIoU of maps, pseudo-masks and
segmenter. The winner is the variant with the best validation segmenter score; test numbers
are reported, never used to choose.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from common.checkpoint import load_model, run_config
from common.cli import Command, compose_checked
from common.config import CONF_DIR, compose_config
from common.data import hospital_split, split_tensors
from common.errors import JobError
from common.files import write_text_atomically
from common.training import evaluate_local, resolve_device, site_label_shift
from post_training.postprocess import SITE_KEYS, check_postprocess_config, run_postprocess
from post_training.stages import BASELINES, MAPS, PSEUDO_MASKS, SEGMENTER, headline_scores

log = logging.getLogger(__name__)

# Stages of metrics.json that get a column per split; the baselines get a row each.
STAGES = (MAPS, PSEUDO_MASKS, SEGMENTER)


def load_variants(name: str) -> dict[str, list[str]]:
    """``conf/ablation/<name>.yaml`` or a YAML path -> {row title: overrides}."""
    path = (
        Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / "ablation" / f"{name}.yaml"
    )
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))
        raise JobError(f"no ablation variants file {path}; known names: {known}")
    variants = OmegaConf.to_container(OmegaConf.load(path).get("variants"))
    if not isinstance(variants, dict) or not variants:
        raise JobError(f"{path} must hold a non-empty mapping 'variants: {{title: [overrides]}}'")
    return {str(title): [str(o) for o in overrides or []] for title, overrides in variants.items()}


def slug(title: str) -> str:
    """A folder name for a row title."""
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_").lower() or "variant"


def classification_accuracy(cfg: Any) -> dict[str, float]:
    """Top-1 accuracy of the checkpoint's classifier on the hospital's val and test splits."""
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    hospital = str(cfg.hospital)
    model, payload = load_model(checkpoint, list(cfg.data.classes), hospital=hospital)
    device = resolve_device(str(cfg.device))
    labels = hospital_split(cfg.data, hospital, "train").labels
    shift = site_label_shift(run_config(payload, checkpoint), hospital, labels, model.num_classes)
    scores = {}
    for split in ("val", "test"):
        data = split_tensors(cfg.data, hospital, split, model.img_size)
        with torch.inference_mode():
            metrics = evaluate_local(
                model, data, {"last_k_layers": 1, "thresholds": [0.5]}, device=device, shift=shift
            )
        scores[split] = metrics["val-accuracy"]
    return scores


def _stage_scores(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{stage key: {"title": title, split: headline scores}} from a metrics.json."""
    return {
        stage["key"]: {
            "title": stage["title"],
            **{split: headline_scores(stage[split]) for split in ("val", "test") if split in stage},
        }
        for stage in metrics["stages"]
    }


def _cell(scores: Mapping[str, Any], stage: str, split: str) -> str:
    values = scores.get(stage, {}).get(split)
    if not values:
        return "–"
    return f"{100 * values['binary']:.1f} / {100 * values['class_aware']:.1f}"


def _cell_types(scores: Mapping[str, Any]) -> str:
    values = [
        scores.get(SEGMENTER, {}).get(split, {}).get("cell_type") for split in ("val", "test")
    ]
    if all(v is None for v in values):
        return "–"
    return " / ".join("–" if v is None else f"{100 * v:.1f}" for v in values)


def ablation_table(rows: Sequence[Mapping[str, Any]], planned: int) -> str:
    """Markdown: one row per variant, the validation winner in bold once all ``planned`` ran.

    The table is written after every variant; one stopped part-way would otherwise crown the
    best of the variants that happened to run first.
    """
    complete = len(rows) >= planned
    # A hospital without masks scores nothing, so no variant is bold.
    scored = [r for r in rows if complete and r["scores"].get(SEGMENTER, {}).get("val")]
    best = (
        max(scored, key=lambda r: r["scores"][SEGMENTER]["val"]["binary"])["title"]
        if scored
        else None
    )
    lines = [
        "| variant | accuracy val / test | segmenter cell types val / test | maps val "
        "| pseudo val | segmenter val | maps test | pseudo test | segmenter test |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        title = f"**{row['title']}**" if row["title"] == best else row["title"]
        accuracy = f"{row['accuracy']['val']:.2f} / {row['accuracy']['test']:.2f}"
        cells = [_cell(row["scores"], s, sp) for sp in ("val", "test") for s in STAGES]
        types = _cell_types(row["scores"])
        lines.append(f"| {title} | {accuracy} | {types} | " + " | ".join(cells) + " |")
    for key in BASELINES:
        if key not in rows[0]["scores"]:
            continue
        title = rows[0]["scores"][key]["title"]
        cells = [_cell(rows[0]["scores"], key, sp) for sp in ("val", "test")]
        lines.append(f"| {title} | – | – | – | – | {cells[0]} | – | – | {cells[1]} |")
    lines.append("")
    lines.append(
        "Cells: binary / class-aware mIoU %. Accuracy: the MCT classifier's; cell types: the "
        "share of the images whose type most of the segmenter's cell pixels name rightly, %. "
        "Bold: best validation segmenter binary mIoU (the choice); test numbers are reported "
        "only."
    )
    if not complete:
        lines.append(
            f"Partial: {len(rows)} of {planned} variants ran (the job stopped before the "
            "others), so none is chosen; run w3s-ablate again for the whole table."
        )
    return "\n".join(lines) + "\n"


def variant_configs(
    variants: Mapping[str, Sequence[str]], overrides: Sequence[str], out: Path
) -> dict[str, DictConfig]:
    """Every variant's post-training config, composed and checked before the first one runs.

    A mistyped override in a later variant would otherwise be found after every variant before
    it had run, minutes each.

    Raises
    ------
    JobError
        Naming the variant and what is wrong with it.
    """
    configs = {}
    folders: dict[str, str] = {}
    for title, changes in variants.items():
        if (other := folders.setdefault(slug(title), title)) != title:
            raise JobError(
                f"variants {other!r} and {title!r} would share the output folder "
                f"{slug(title)}: titles must differ in more than case and punctuation"
            )
        folder = f"output_dir={out.resolve() / slug(title)}"
        try:
            configs[title] = compose_checked(
                [*overrides, *changes, folder], "postprocess", check_postprocess_config
            )
        except JobError as error:
            raise JobError(f"variant {title!r}: {error.brief()}") from None
    return configs


def run_ablation(variants: Mapping[str, Sequence[str]], overrides: Sequence[str]) -> Path:
    """Run every variant and write ``ablation.md`` and ``ablation.json``; return the folder."""
    base = compose_config(overrides, "postprocess")
    if OmegaConf.is_missing(base, "checkpoint"):
        raise JobError("checkpoint=... is required: the final_model.pt of a training run")
    if base.output_dir:
        out = Path(str(base.output_dir))
    else:
        out = Path(str(base.checkpoint)).resolve().parent / "ablation" / str(base.hospital)
    configs = variant_configs(variants, overrides, out)
    rows = []
    for index, (title, changes) in enumerate(variants.items(), start=1):
        cfg = configs[title]
        log.info("variant %d/%d %r: %s", index, len(variants), title, " ".join(changes))
        metrics = run_postprocess(cfg)
        scores = _stage_scores(metrics)
        rows.append(
            {
                "title": title,
                "overrides": list(changes),
                "accuracy": classification_accuracy(cfg),
                "scores": scores,
            }
        )
        # Written after every variant, so a failure later loses nothing already measured.
        write_text_atomically(out / "ablation.json", json.dumps(rows, indent=1))
        write_text_atomically(out / "ablation.md", ablation_table(rows, len(variants)))
    log.info("ablation of %s:\n%s", base.hospital, ablation_table(rows, len(variants)))
    log.info("table: %s", out / "ablation.md")
    return out


def check_ablation_config(cfg: DictConfig) -> None:
    """The variants file first (it names what runs), then what every variant shares."""
    load_variants(str(cfg.variants))
    check_postprocess_config(cfg)


def _run(cfg: DictConfig, overrides: list[str]) -> Path:
    shared = [o for o in overrides if not o.startswith("variants=")]
    return run_ablation(load_variants(str(cfg.variants)), shared)


COMMAND = Command(
    name="w3s-ablate",
    summary=__doc__,
    config="w3s_ablate",
    job=_run,
    keys={
        "variants": "conf/ablation/<name>.yaml or a YAML file of variants (required)",
        **SITE_KEYS,
        "output_dir": "where rows go (default: <run dir>/ablation/<hospital>)",
    },
    examples=[
        "w3s-ablate variants=levers checkpoint=<run>/final_model.pt data=wbc_zxaoyou "
        "hospital=dataset1",
    ],
    check=check_ablation_config,
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-ablate``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
