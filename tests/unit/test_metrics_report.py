"""post_training/report: the job's metrics.md says what was chosen, and on what."""

import pytest

from post_training.report import write_report
from post_training.stages import Stage


@pytest.mark.parametrize("scored", [True, False])
def test_the_table_says_whether_its_settings_were_chosen_on_validation(tmp_path, scored):
    summary = {
        "hospital": "site",
        "round": 3,
        "classes": ["a", "b"],
        "images": {"train": 5, "val": 2, "test": 2},
        "absent": "skip",
        "select_by": "binary",
        "scored": scored,
    }
    stages = [Stage("maps", "maps (seeds)", {"background": 0.4, "model": "personalized"}, {}, 1.0)]
    write_report(tmp_path, summary, stages)
    text = (tmp_path / "metrics.md").read_text()
    assert ("choices by binary mIoU on val" in text) == scored
    assert ("tuned on val" in text) == scored
    assert ("nothing chosen on val" in text) != scored
    assert "| maps (seeds) | background 0.4, model personalized |" in text
