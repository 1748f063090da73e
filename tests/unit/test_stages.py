"""post_training/stages: options of the pseudo-mask method tuned on the validation split."""

import numpy as np
import pytest

from post_training.stages import Evaluation, Split, option_grid, tuned_options


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
