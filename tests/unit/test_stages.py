"""post_training/stages: options of the pseudo-mask method tuned on the validation split."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.config import compose_config
from common.data import hospital_split
from common.localization import MapSettings, generate_maps, maps_orientation
from common.model import create_mct_model
from common.pseudo import MapRecord
from post_training.baselines import disk_mask, label_cells
from post_training.stages import (
    Evaluation,
    Split,
    disk_stage,
    make_maps,
    option_grid,
    seeds_stage,
    tuned_options,
)


def val_evaluation(truth: list[np.ndarray] | None) -> Evaluation:
    """An evaluation that holds only a validation split's truth: all a choice on it reads."""
    val = Split(data=None, stems=[], truth=truth, records=[])  # type: ignore[arg-type]
    return Evaluation({"val": val}, num_labels=2, cfg={"absent": "skip", "select_by": "binary"})


def test_tuned_options_choose_on_validation_and_keep_the_value_without_truth():
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 1
    cfg = {
        "method": "stain_grow",
        "grow": "region",
        "cell_fraction": 0.3,
        "tune": {"cell_fraction": [0.3, 0.15]},
    }

    def label_val(options):  # only 0.15 reproduces the truth
        return [truth if options["cell_fraction"] == 0.15 else np.ones_like(truth)]

    chosen = tuned_options(cfg, val_evaluation([truth]), label_val)
    assert chosen == {"method": "stain_grow", "grow": "region", "cell_fraction": 0.15}
    assert tuned_options(cfg, val_evaluation(None), label_val)["cell_fraction"] == 0.3


def test_tuned_options_reject_what_the_method_does_not_have():
    with pytest.raises(ValueError, match="pseudo.tune.radius"):
        tuned_options({"method": "stain_grow", "tune": {"radius": [1]}}, val_evaluation(None), list)
    with pytest.raises(ValueError, match="empty"):
        cfg = {"method": "stain_grow", "reach": 2.0, "tune": {"reach": []}}
        tuned_options(cfg, val_evaluation(None), list)


def test_an_option_the_other_settings_leave_unread_is_not_tuned():
    truth = np.ones((8, 8), np.uint8)
    cfg = {
        "method": "stain_grow",
        "grow": "radius",  # cell_fraction is read only when the region grows
        "cell_fraction": 0.3,
        "tune": {"cell_fraction": [0.3, 0.15]},
    }

    def label_val(options):
        raise AssertionError(f"tried {options}: every candidate gives the same masks")

    assert tuned_options(cfg, val_evaluation([truth]), label_val)["cell_fraction"] == 0.3


def test_an_option_read_by_some_candidates_is_tuned_in_those():
    cfg = {
        "method": "stain_grow",
        "grow": "radius",
        "cell_fraction": 0.2,
        "tune": {"grow": ["radius", "region"], "cell_fraction": [0.15, 0.3]},
    }
    assert option_grid(cfg)[1] == [
        {"grow": "radius"},  # one candidate: cell_fraction changes nothing there
        {"grow": "region", "cell_fraction": 0.15},
        {"grow": "region", "cell_fraction": 0.3},
    ]


def test_every_splits_maps_take_the_training_splits_orientation_of_the_head():
    """A test split that would decide alone the other way is oriented as training decided."""
    cfg = compose_config(
        [
            "data.hospitals.hospital_a.num_images=16",
            "data.hospitals.hospital_a.image_size=32",
            "checkpoint=/x/final_model.pt",
            "hospital=hospital_a",
        ],
        config_name="postprocess",
    )
    torch.manual_seed(0)
    model_cfg = compose_config(["model.img_size=32"]).model
    model = create_mct_model(model_cfg, num_classes=len(cfg.data.classes)).eval()
    settings = MapSettings.from_config(OmegaConf.to_container(cfg.localization))
    train, test = (hospital_split(cfg.data, "hospital_a", s).images for s in ("train", "test"))
    cpu = torch.device("cpu")

    def decisions(bias: float) -> tuple[bool | None, bool | None]:
        model.fg_head.bias.fill_(bias)
        return tuple(maps_orientation(model, s, settings, device=cpu) for s in (train, test))

    with torch.no_grad():
        bias = next(b / 20 for b in range(-200, 200) if len(set(decisions(b / 20))) == 2)
        train_flip, test_alone = decisions(bias)
    test_maps = make_maps(model, cfg, "hospital_a", cpu)["test"].records
    oriented = generate_maps(model, test, [0] * len(test), settings, device=cpu, flip=train_flip)
    alone = generate_maps(model, test, [0] * len(test), settings, device=cpu, flip=test_alone)
    for record, by_train, by_test in zip(test_maps, oriented[0], alone[0], strict=True):
        label = record.label
        torch.testing.assert_close(record.maps[label], by_train[0])
        assert not torch.allclose(record.maps[label], by_test[0])


def _split(truth: list[np.ndarray], records: list[MapRecord] = (), images=()) -> Split:
    """A split of the given truths, map records and images (of class 0), without files."""
    data = SimpleNamespace(images=list(images), labels=np.zeros(len(images), np.int64))
    return Split(data=data, stems=[], truth=truth, records=list(records))  # type: ignore[arg-type]


EVALUATION = {
    "absent": "skip",
    "select_by": "binary",
    "thresholds": [0.2, 0.5, 0.8],
    "disk_radii": [0.5, 1.0],
}


def test_the_maps_background_is_chosen_on_validation_and_only_scored_on_test():
    def record(*row: float) -> MapRecord:  # one class, one row of four pixels
        image = np.zeros((1, 4, 3), np.uint8)
        return MapRecord(image, 0, torch.tensor([[row]]), torch.zeros(1, 1), (1, 1))

    splits = {  # only 0.5 reproduces the validation truth; on test every constant ties
        "val": _split([np.array([[1, 1, 0, 0]])], [record(0.9, 0.6, 0.3, 0.1)]),
        "test": _split([np.array([[1, 0, 0, 0]])], [record(0.95, 0.9, 0.85, 0.1)]),
    }
    stage, labels = seeds_stage(splits, Evaluation(splits, 2, EVALUATION), chunk=4)
    assert stage.choice == {"background": 0.5}
    np.testing.assert_array_equal(labels["test"][0], [[1, 1, 1, 0]])
    assert stage.scores["test"].binary_miou < 1.0 == stage.scores["val"].binary_miou


def test_a_baselines_setting_is_chosen_on_validation_and_only_scored_on_test():
    sides = {"val": 20, "test": 40}
    truth = {"val": [disk_mask(20, 20, 0.5)], "test": [disk_mask(40, 40, 1.0)]}
    splits = {
        name: _split(label_cells(truth[name], [0]), images=[np.zeros((side, side, 3), np.uint8)])
        for name, side in sides.items()
    }
    stage = disk_stage(splits, Evaluation(splits, 2, EVALUATION))
    assert stage.choice == {"radius": 0.5}
    assert stage.scores["test"].binary_miou < 1.0 == stage.scores["val"].binary_miou


def test_the_evaluation_scores_and_chooses_by_its_configured_policies():
    truth = [np.array([0, 0, 1, 1, 1, 1])]
    splits = {name: _split(truth) for name in ("val", "test")}
    right = {name: truth for name in ("val", "test")}
    # Class 2 absent from truth and prediction: skipped, or scored as 0 ('zero').
    skip = Evaluation(splits, 3, {**EVALUATION, "select_by": "class_aware"})
    zero = Evaluation(splits, 3, {**EVALUATION, "absent": "zero"})
    assert skip.score(right)["test"].class_aware_miou == 1.0
    assert zero.score(right)["test"].class_aware_miou == pytest.approx(2 / 3)
    candidates = {
        "whole cell, wrong class": [np.array([0, 0, 2, 2, 2, 2])],
        "right class, too large": [np.array([0, 1, 1, 1, 1, 1])],
    }
    assert zero.select(list(candidates), candidates.get) == "whole cell, wrong class"
    assert skip.select(list(candidates), candidates.get) == "right class, too large"
