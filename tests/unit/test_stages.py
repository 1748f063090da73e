"""post_training/stages: options of the pseudo-mask method tuned on the validation split."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.config import compose_config
from common.data import hospital_split
from common.localization import MapSettings, generate_maps, maps_orientation
from common.model import create_mct_model
from post_training.stages import Evaluation, Split, make_maps, option_grid, tuned_options


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
