"""The job's report: ``metrics.json``, the ``metrics.md`` table and a figure of every stage.

Nothing in them names a file or a sample, so the metrics may leave the hospital.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.data.splits import SPLITS
from common.metrics import SegmentationScores
from post_training.artifacts import class_colours, heatmap, overlay, save_grid
from post_training.stages import Split, Stage

FIGURE_ROWS = 4


def save_figure(
    path: Path,
    split: Split,
    seeds: Sequence[np.ndarray],
    pseudo: Sequence[np.ndarray],
    predicted: Sequence[np.ndarray],
) -> None:
    """One row per image (the first test images): each stage's output side by side."""
    titles = ["image", "ground truth", "maps", "seeds", "pseudo-mask", "segmenter"]
    if split.truth is None:
        titles.remove("ground truth")
    rows = []
    for i in range(min(FIGURE_ROWS, len(split.records))):
        image = split.data.images[i]
        row = [image]
        if split.truth is not None:
            row.append(overlay(image, split.truth[i]))
        row += [
            heatmap(image, split.records[i].maps.amax(0).numpy()),
            overlay(image, seeds[i]),
            overlay(image, pseudo[i]),
            overlay(image, predicted[i]),
        ]
        rows.append(row)
    save_grid(path, rows, titles, legend=class_colours(split.data.classes))


def _percent(scores: SegmentationScores | None, key: str) -> str:
    value = None if scores is None else getattr(scores, key)
    return "-" if value is None or np.isnan(value) else f"{100 * value:.1f}"


def markdown_table(stages: Sequence[Stage], tuned: bool = True) -> str:
    """The metrics table: one row per stage, test-split mIoU in percent.

    ``tuned``: the settings were chosen on validation; at a hospital without ground-truth
    masks they are the configured ones.
    """
    setting = "setting (tuned on val)" if tuned else "setting (as configured)"
    lines = [
        f"| stage | {setting} | class-aware mIoU (test) | binary mIoU (test) "
        "| class-aware mIoU (val) | binary mIoU (val) |",
        "|---|---|---|---|---|---|",
    ]
    for stage in stages:
        choice = ", ".join(f"{k} {v}" for k, v in stage.choice.items())
        test, val = stage.scores.get("test"), stage.scores.get("val")
        lines.append(
            f"| {stage.title} | {choice} | {_percent(test, 'class_aware_miou')} "
            f"| {_percent(test, 'binary_miou')} | {_percent(val, 'class_aware_miou')} "
            f"| {_percent(val, 'binary_miou')} |"
        )
    return "\n".join(lines)


def write_report(out: Path, summary: dict[str, Any], stages: Sequence[Stage]) -> dict[str, Any]:
    """``metrics.json`` (everything) and ``metrics.md`` (the table); no paths, no sample ids."""
    metrics = {**summary, "stages": [stage.to_dict() for stage in stages]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    scored = summary["scored"]
    choices = (
        f"choices by {summary['select_by']} mIoU on val"
        if scored
        else "no ground-truth masks at this hospital: nothing scored, nothing chosen on val "
        "(every setting, and the fine-tuned model's use, as configured)"
    )
    header = (
        f"# {summary['hospital']}: post-training metrics\n\n"
        f"Model round {summary['round']}; splits train/val/test = "
        f"{'/'.join(str(summary['images'][s]) for s in SPLITS)} images; class-aware mIoU over "
        f"background + {len(summary['classes'])} classes, absent classes: {summary['absent']}; "
        f"{choices}.\n\n"
    )
    table = markdown_table(stages, tuned=scored)
    text = header + table + "\n" + cell_types(stages, summary["classes"])
    (out / "metrics.md").write_text(text, encoding="utf-8")
    return metrics


def cell_types(stages: Sequence[Stage], classes: Sequence[str]) -> str:
    """Per stage that names the cell types itself: how often it is right, and in which way not.

    The confusion is of the test images. The other stages draw each image's cell with the
    image's own label.
    """
    parts = []
    for stage in stages:
        test, val = stage.scores.get("test"), stage.scores.get("val")
        if test is None or val is None or test.cell_types is None:
            continue
        parts.append(
            f"\n{stage.title} names the cell type of {_percent(test, 'cell_type_accuracy')} % of "
            f"the test images ({_percent(val, 'cell_type_accuracy')} % of val) by the type of "
            "most of its cell pixels; the other stages are given each image's label. Test "
            "images by true type (rows) and the type it names (columns):\n\n"
            + confusion_table(test.cell_types, classes)
            + "\n"
        )
    return "".join(parts)


def confusion_table(confusion: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """Markdown of a cell-type confusion; its column 0, no type named, goes last."""
    lines = [
        "| true \\ named | " + " | ".join(classes) + " | no cell |",
        "|---" * (len(classes) + 2) + "|",
    ]
    for name, row in zip(classes, confusion, strict=True):
        lines.append(f"| {name} | " + " | ".join(map(str, [*row[1:], row[0]])) + " |")
    return "\n".join(lines) + "\n"
