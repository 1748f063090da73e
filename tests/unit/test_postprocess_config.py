"""``w3s-postprocess`` refuses a bad setting by name before it looks for the checkpoint."""

from __future__ import annotations

import pytest

from common.config import compose_config
from common.errors import JobError
from post_training.postprocess import check_postprocess_config


@pytest.mark.parametrize(
    "bad",
    [
        "self_training.confidence=1.5",
        "personalize.epochs=-1",
        "personalize.epochs=abc",
        "personalize.copies=0",
        "segmenter.members=0",
        "segmenter.members=two",
        "device=gpu",
        "device=cuda:64",
    ],
)
def test_a_bad_setting_is_named_before_the_checkpoint_is_looked_for(tmp_path, bad):
    missing = tmp_path / "nowhere" / "final_model.pt"
    cfg = compose_config([f"checkpoint={missing}", "hospital=hospital_a", bad], "postprocess")
    with pytest.raises(JobError) as error:
        check_postprocess_config(cfg)
    assert bad in str(error.value)
    assert "file not found" not in str(error.value)


def test_with_good_settings_the_missing_checkpoint_is_what_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "final_model.pt"
    cfg = compose_config([f"checkpoint={missing}", "hospital=hospital_a"], "postprocess")
    with pytest.raises(JobError, match="file not found"):
        check_postprocess_config(cfg)
