"""Splits a hospital cannot use are refused before any job runs on them.

Post-training refuses a hospital whose images no longer fall into the splits they trained in;
``w3s-verify`` one whose data leaves a split empty, which training would fail every round.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from common.data import split_digest
from common.errors import JobError
from post_training.postprocess import check_same_split
from post_training.verify import verify_hospitals
from tests.unit.test_data_readers import FIVE, data_cfg, write_image

CHECKPOINT = Path("/runs/r/final_model.pt")


@pytest.fixture
def hospital(tmp_path):
    """A class-folder hospital of 20 real image files, and its data config."""
    for cls in FIVE:
        for i in range(4):
            write_image(tmp_path / cls / f"{i}.png", 20, 24, seed=i)
    return tmp_path, data_cfg({"h": {"format": "class_folders", "root": str(tmp_path)}})


def trained_on(data, splits):
    """A model file's payload as the training run wrote it: its config and fingerprints."""
    return {"config": OmegaConf.to_yaml(OmegaConf.create({"data": data})), "splits": splits}


def test_the_images_the_model_trained_on_pass(hospital):
    _, data = hospital
    check_same_split(trained_on(data, {"h": [split_digest(data, "h")]}), data, CHECKPOINT, "h")


@pytest.mark.parametrize(
    ("split", "said"),
    [
        (
            {"folds": 5, "fold": 2},
            "with data.split.folds=null data.split.fold=0, this job has "
            "data.split.folds=5 data.split.fold=2",
        ),
        (
            {"fractions": [0.7, 0.15, 0.15]},
            "with data.split.fractions=[0.6,0.2,0.2], this job "
            "has data.split.fractions=[0.7,0.15,0.15]",
        ),
    ],
)
def test_another_split_is_refused_naming_the_settings_to_pass(hospital, split, said):
    _, data = hospital
    payload = trained_on(data, {"h": [split_digest(data, "h")]})
    other = OmegaConf.merge(data, {"split": split})
    with pytest.raises(JobError, match=re.escape(f"{CHECKPOINT} was trained {said}:")):
        check_same_split(payload, other, CHECKPOINT, "h")


def test_an_image_removed_since_training_is_refused_naming_the_hospital(hospital, tmp_path):
    root, data = hospital
    payload = trained_on(data, {"h": [split_digest(data, "h")]})
    # The site's folder later, one image fewer (another path: this process read the first).
    later = shutil.copytree(root, tmp_path.parent / f"{tmp_path.name}-later")
    (later / "monocyte" / "1.png").unlink()
    changed = data_cfg({"h": {"format": "class_folders", "root": str(later)}})
    with pytest.raises(JobError, match="hospital h's images are not the ones the model trained"):
        check_same_split(payload, changed, CHECKPOINT, "h")


def test_a_split_that_changed_during_training_is_refused(hospital):
    _, data = hospital
    digest = split_digest(data, "h")
    with pytest.raises(JobError, match="hospital h's images changed while the model trained"):
        check_same_split(trained_on(data, {"h": [digest, digest + 1]}), data, CHECKPOINT, "h")


def test_a_model_file_without_this_hospitals_fingerprint_is_taken_as_it_is(hospital):
    root, data = hospital
    (root / "monocyte" / "1.png").unlink()
    check_same_split(trained_on(data, {"other": [1]}), data, CHECKPOINT, "h")
    check_same_split(trained_on(data, {}) | {"splits": None}, data, CHECKPOINT, "h")


def test_w3s_verify_names_a_split_that_training_would_draw_without_an_image(tmp_path, capsys):
    # Two images of one class: one trains, one validates, none is left to test. The data read
    # cleanly, so w3s-verify passed it and training refused the hospital every round.
    for i in range(2):
        write_image(tmp_path / "neutrophil" / f"{i}.png", 20, 24, seed=i)
    data = data_cfg({"h": {"format": "class_folders", "root": str(tmp_path)}})
    folds = OmegaConf.merge(data, {"split": {"folds": 5, "fold": 3}})
    assert verify_hospitals(OmegaConf.create({"data": data})) == 1
    assert verify_hospitals(OmegaConf.create({"data": folds})) == 1
    fixed, cross = capsys.readouterr().out.split("data: ?")[1:]
    empty = "split holds no image (too few images per class; add images, or set"
    assert "h: 2 usable images, masks: no, 1 problem(s)" in fixed
    assert f"h: 1 problem(s)\n  [empty_split] its test {empty} data.split.fractions)" in fixed
    for split in ("val", "test"):
        assert f"[empty_split] its {split} {empty} fewer data.split.folds)" in cross
    # A test fraction of 0 asks for no test split: training needs none.
    no_test = OmegaConf.merge(data, {"split": {"fractions": [0.5, 0.5, 0.0]}})
    assert verify_hospitals(OmegaConf.create({"data": no_test})) == 0


def test_w3s_verify_passes_a_hospital_whose_splits_all_hold_images(hospital, capsys):
    _, data = hospital
    assert verify_hospitals(OmegaConf.create({"data": data})) == 0
    assert capsys.readouterr().out.endswith("all data verified: no problems\n")
