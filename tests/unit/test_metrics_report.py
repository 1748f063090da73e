"""post_training/report: the job's metrics.md says what was chosen, and on what."""

import numpy as np
import pytest

from common.metrics import score_label_maps
from post_training.report import write_report
from post_training.stages import Stage

SUMMARY = {
    "hospital": "site",
    "round": 3,
    "classes": ["a", "b"],
    "images": {"train": 5, "val": 2, "test": 2},
    "absent": "skip",
    "select_by": "binary",
    "scored": True,
}


@pytest.mark.parametrize("scored", [True, False])
def test_the_table_says_whether_its_settings_were_chosen_on_validation(tmp_path, scored):
    summary = {**SUMMARY, "scored": scored}
    stages = [Stage("maps", "maps (seeds)", {"background": 0.4, "model": "personalized"}, {}, 1.0)]
    write_report(tmp_path, summary, stages)
    text = (tmp_path / "metrics.md").read_text()
    assert ("choices by binary mIoU on val" in text) == scored
    assert ("tuned on val" in text) == scored
    assert ("nothing chosen on val" in text) != scored
    assert "| maps (seeds) | background 0.4, model personalized |" in text


def test_the_report_says_how_many_images_the_segmenter_names_rightly(tmp_path):
    truths = [np.array([0, 1, 1]), np.array([0, 2, 2])]
    scores = {
        "val": score_label_maps(truths, truths, 3, cell_types=True),
        "test": score_label_maps([truths[0], truths[0]], truths, 3, cell_types=True),
    }
    disk = {split: score_label_maps(truths, truths, 3) for split in scores}
    stages = [
        Stage("disk", "baseline: centred disk", {"radius": 0.5}, disk, 1.0),
        Stage("segmenter", "segmenter (lraspp)", {"epochs": 1}, scores, 1.0),
    ]
    write_report(tmp_path, SUMMARY, stages)
    text = (tmp_path / "metrics.md").read_text()
    assert (
        "segmenter (lraspp) names the cell type of 50.0 % of the test images (100.0 % of val)"
        in text
    )
    assert "baseline: centred disk names" not in text
    # test: the b cell was named a; no image went without a type
    rows = ["| true \\ named | a | b | no cell |", "|---|---|---|---|", "| a | 1 | 0 | 0 |"]
    assert "\n".join([*rows, "| b | 1 | 0 | 0 |"]) in text
