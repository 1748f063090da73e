"""``w3s-postprocess`` refuses a bad setting by name before it looks for the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from common.config import compose_config
from common.errors import JobError
from common.files import staged_outputs
from common.model import create_mct_model
from post_training.postprocess import (
    OUTPUTS,
    check_layers,
    check_output_folder,
    check_postprocess_config,
    check_split_sizes,
    stage_grid_name,
)


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
        "evaluation.otsu_channels=[inverted_gren]",
        "evaluation.disk_radii=[]",
        "evaluation.thresholds=[0.5,1.5]",
        "evaluation.select_by=binry",
        "evaluation.absent=skipp",
        "segmenter.batch_size=1",
        "segmenter.optimizer=adam",
        "segmenter.schedule=cosine",
        "segmenter.arch=unet",
        "segmenter.epochs=abc",
        "segmenter.min_steps=-1",
        "segmenter.lr=0",
        "segmenter.warmup=1.5",
        "segmenter.backbone_weights_file=/nowhere/mobilenet.pth",
        "localization.input_size=abc",
        "localization.last_k_layers=abc",
        "localization.scales=abc",
        "localization.refine=yes",
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


def test_a_hospital_too_small_for_the_job_is_named_with_its_split_sizes(tmp_path):
    named = ["checkpoint=x.pt", "hospital=hospital_a"]
    six = compose_config([*named, "data.hospitals.hospital_a.num_images=6"], "postprocess")
    with pytest.raises(JobError, match="hospital_a: its train / val / test splits hold 5 / 1 / 0"):
        check_split_sizes(six.data, "hospital_a")
    # Three images of one cell type: one training image.
    (tmp_path / "neutrophil").mkdir()
    for shade, name in enumerate(("a", "b", "c")):  # three images, not copies of one
        picture = Image.new("RGB", (20, 20), (255, 255, 250 + shade))
        picture.save(tmp_path / "neutrophil" / f"{name}.png")
    site = f"+data.hospitals.site={{format:class_folders,root:'{tmp_path}'}}"
    three = compose_config(["checkpoint=x.pt", "hospital=site", site], "postprocess")
    with pytest.raises(JobError, match="site: its train / val / test splits hold 1 / 1 / 1"):
        check_split_sizes(three.data, "site")
    check_split_sizes(compose_config(named, "postprocess").data, "hospital_a")


def test_last_k_layers_beyond_the_models_depth_is_named():
    cfg = compose_config(["checkpoint=x.pt", "hospital=hospital_a"], "postprocess")
    trained = compose_config(["model.img_size=32"])
    model = create_mct_model(trained.model, len(trained.data.classes))
    check_layers(cfg, model)
    cfg.localization.last_k_layers = len(model.blocks) + 1
    with pytest.raises(JobError, match=f"last_k_layers={len(model.blocks) + 1}: the model has"):
        check_layers(cfg, model)


def test_the_methods_own_value_is_checked_where_a_tune_list_covers_it():
    # A site without masks uses it: there it failed, mid-job, in a traceback.
    named = ["checkpoint=x.pt", "hospital=hospital_a", "pseudo.cell_fraction=1.5"]
    with pytest.raises(JobError, match="pseudo=stain_grow: cell_fraction must be in"):
        check_postprocess_config(compose_config(named, "postprocess"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("pseudo.background.value=0.4x", "background.value must be null .* got '0.4x'"),
        ("pseudo.background.value=39", r"background.value must be null .* in \[0, 1\]"),
        ("pseudo.background.value=true", "background.value must be null"),
    ],
)
def test_a_background_setting_is_checked_before_the_maps(override, expected):
    # It failed at the pseudo-mask stage, after the maps and seeds, in a traceback.
    named = ["checkpoint=x.pt", "hospital=hospital_a", "pseudo=psa", override]
    with pytest.raises(JobError, match=expected):
        check_postprocess_config(compose_config(named, "postprocess"))


MODEL = Path("/runs/final_model.pt")


def test_a_folder_of_the_users_own_is_not_replaced_by_name(tmp_path):
    check_output_folder(tmp_path / "new", MODEL)  # nothing there: nothing to replace
    (tmp_path / "notes.txt").write_text("mine")
    check_output_folder(tmp_path, MODEL)  # no entry of the job's names
    (tmp_path / "config.yaml").write_text("project: mine\n")
    (tmp_path / "maps").mkdir()
    with pytest.raises(JobError, match="holds config.yaml, maps, which no w3s-postprocess run"):
        check_output_folder(tmp_path, MODEL)
    for other in (b": [\n", "project: ü\n".encode("utf-16")):  # no YAML, no UTF-8
        (tmp_path / "config.yaml").write_bytes(other)
        with pytest.raises(JobError, match="holds config.yaml, maps"):
            check_output_folder(tmp_path, MODEL)
    # An earlier run's folder: its config.yaml names the checkpoint and hospital it ran with.
    (tmp_path / "config.yaml").write_text("checkpoint: /runs/final_model.pt\nhospital: a\n")
    check_output_folder(tmp_path, MODEL)


def test_the_model_the_run_reads_is_not_among_the_outputs_it_replaces(tmp_path):
    # Another pseudo-mask method from an earlier run's kept fine-tune, into the same folder:
    # the run replaced personalized_model.pt, and wrote none where the global model won.
    (tmp_path / "config.yaml").write_text("checkpoint: /runs/final_model.pt\nhospital: a\n")
    tuned = tmp_path / "personalized_model.pt"
    tuned.write_bytes(b"model")
    with pytest.raises(JobError, match="is this run's output personalized_model.pt in output_dir"):
        check_output_folder(tmp_path, tuned)
    with pytest.raises(JobError, match="is this run's output maps in output_dir"):
        check_output_folder(tmp_path, tmp_path / "maps" / "model.pt")
    check_output_folder(tmp_path / "postprocess" / "a", tuned)  # the default folder: beside it


def test_a_stage_grid_drawn_before_any_job_does_not_make_the_folder_someone_elses(tmp_path):
    # w3s-stages draws from the checkpoint alone, into the folder a job will use.
    (tmp_path / stage_grid_name("test")).touch()
    check_output_folder(tmp_path, tmp_path.parent / "final_model.pt")
    (tmp_path / "metrics.md").touch()  # a file of the user's of a job's name still is
    with pytest.raises(JobError, match="holds metrics.md, which no w3s-postprocess run wrote"):
        check_output_folder(tmp_path, tmp_path.parent / "final_model.pt")


def test_a_rerun_removes_the_stage_grids_drawn_of_the_earlier_outputs(tmp_path):
    # w3s-stages draws into the job's folder; kept, its picture showed the earlier run's masks.
    earlier = [tmp_path / stage_grid_name(split) for split in ("val", "test")]
    for picture in earlier:
        picture.touch()
    with staged_outputs(tmp_path, OUTPUTS) as staging:
        (staging / "metrics.md").touch()
    assert not any(picture.exists() for picture in earlier)
