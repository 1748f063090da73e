"""w3s-stages' own settings: refused in one line, before the checkpoint is looked for."""

import pytest

from common.config import compose_config
from common.errors import JobError
from experiments.stage_grid import check_stage_grid_config, maps_model


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("grid.num_images=abc", "grid.num_images=abc: expected a whole number"),
        ("grid.num_images=0", "grid.num_images=0: expected a whole number >= 1"),
        ("grid.split=validation", "grid.split=validation: expected one of train, val, test"),
    ],
)
def test_a_grid_setting_that_cannot_make_a_grid_is_named(override, needle):
    cfg = compose_config(
        ["checkpoint=/no/such/final_model.pt", "hospital=hospital_a", override],
        config_name="postprocess",
    )
    with pytest.raises(JobError, match=needle):
        check_stage_grid_config(cfg)


def test_good_grid_settings_go_on_to_the_post_training_checks():
    cfg = compose_config(
        ["checkpoint=/no/such/final_model.pt", "hospital=hospital_a", "grid.split=val"],
        config_name="postprocess",
    )
    with pytest.raises(JobError, match="checkpoint=.*file not found"):
        check_stage_grid_config(cfg)


def test_the_fine_tuned_copy_is_shown_only_for_the_checkpoint_its_job_ran_on(tmp_path, caplog):
    final, round_five = tmp_path / "final_model.pt", tmp_path / "checkpoints" / "round_005.pt"
    out = tmp_path / "postprocess" / "hospital_a"
    out.mkdir(parents=True)
    (out / "personalized_model.pt").write_bytes(b"the fine-tune of final_model.pt")
    assert maps_model(out, final) == final  # no job recorded: nothing says whose copy it is
    (out / "config.yaml").write_text(f"checkpoint: {final}\n")
    assert maps_model(out, final) == out / "personalized_model.pt"
    assert maps_model(out, round_five) == round_five
    assert "holds the w3s-postprocess job of" in caplog.text
