"""The ablation runner's table and variant files (the runs themselves: tests/integration)."""

from __future__ import annotations

import numpy as np
import pytest

from common.checkpoint import save_model
from common.config import compose_config
from common.data import hospital_split
from common.errors import JobError
from common.model import create_mct_model
from experiments import ablation
from experiments.ablation import _stage_scores, ablation_table, load_variants, slug


def _stage(key: str, title: str, val: float, test: float) -> dict:
    return {
        "key": key,
        "title": title,
        "val": {"binary_miou": val, "class_aware_miou": val / 2},
        "test": {"binary_miou": test, "class_aware_miou": test / 2},
    }


def _metrics(seg_val: float, seg_test: float) -> dict:
    segmenter = _stage("segmenter", "segmenter (deeplabv3_mobilenet_v3_large)", seg_val, seg_test)
    segmenter["val"]["cell_type_accuracy"], segmenter["test"]["cell_type_accuracy"] = 0.75, 0.5
    return {
        "stages": [
            _stage("maps", "maps (seeds)", 0.5, 0.4),
            _stage("pseudo_masks", "pseudo-masks (attn_rw)", 0.6, 0.5),
            segmenter,
            _stage("disk", "baseline: centred disk", 0.8, 0.7),
        ]
    }


def test_the_winner_is_chosen_on_validation_not_test() -> None:
    rows = [
        {
            "title": "good on test",
            "accuracy": {"val": 0.5, "test": 0.5},
            "scores": _stage_scores(_metrics(0.60, 0.99)),
        },
        {
            "title": "good on val",
            "accuracy": {"val": 0.5, "test": 0.5},
            "scores": _stage_scores(_metrics(0.70, 0.10)),
        },
    ]
    table = ablation_table(rows, 2)
    assert "| **good on val** |" in table
    assert "| good on test |" in table
    assert "Partial" not in table
    # segmenter test cell of the second row: binary / class-aware in percent
    assert "10.0 / 5.0" in table.splitlines()[3]
    # the MCT's accuracy, then the share of the cell types the segmenter names, val / test
    assert table.splitlines()[3].startswith("| **good on val** | 0.50 / 0.50 | 75.0 / 50.0 |")
    assert "| baseline: centred disk | – | – | – | – | 80.0 / 40.0 |" in table


def test_every_shipped_variant_file_parses() -> None:
    variants = load_variants("levers")
    assert variants["maps + attention walk (reference)"] == ["pseudo=attn_rw"]
    assert all(isinstance(o, list) for o in variants.values())
    for title, overrides in variants.items():  # every override names a real key or choice
        own = [o for o in overrides if not o.startswith("checkpoint=")]
        cfg = compose_config([*own, "checkpoint=x.pt", "hospital=h"], "postprocess")
        assert cfg.pseudo.method, title


def test_unknown_variants_name_lists_the_known_ones() -> None:
    with pytest.raises(JobError, match="levers"):
        load_variants("no_such_file")


def test_slug_is_a_safe_folder_name() -> None:
    assert slug("min-max factors, mean (FL-W3S)") == "min_max_factors_mean_fl_w3s"


def test_a_hospital_without_masks_gets_a_table_without_a_winner() -> None:
    unscored = {"stages": [{"key": k, "title": k} for k in ("maps", "pseudo_masks", "segmenter")]}
    rows = [
        {"title": t, "accuracy": {"val": 0.5, "test": 0.5}, "scores": _stage_scores(unscored)}
        for t in ("a", "b")
    ]
    table = ablation_table(rows, 2)
    assert "**" not in table and "| a | 0.50 / 0.50 | – | – |" in table


def test_a_table_of_an_ablation_stopped_part_way_says_so_and_chooses_nothing() -> None:
    row = {"title": "ran", "accuracy": {"val": 0.5, "test": 0.5}}
    table = ablation_table([{**row, "scores": _stage_scores(_metrics(0.70, 0.10))}], 3)
    assert "**" not in table and "| ran |" in table
    assert "Partial: 1 of 3 variants ran" in table


def test_a_bad_variant_is_named_before_any_variant_runs(tmp_path, monkeypatch, capsys) -> None:
    ran = []
    monkeypatch.setattr(ablation, "run_postprocess", ran.append)
    variants = tmp_path / "variants.yaml"
    variants.write_text(
        "variants:\n  threshold: [pseudo=threshold]\n  typo: [pseudo.cell_fractoin=0.3]\n"
    )
    checkpoint = tmp_path / "final_model.pt"
    checkpoint.write_bytes(b"")
    status = ablation.main(
        [f"variants={variants}", f"checkpoint={checkpoint}", "hospital=hospital_a"]
    )
    assert status == 2 and ran == []
    error = capsys.readouterr().err.strip()
    assert error.startswith(
        "w3s-ablate: variant 'typo': pseudo.cell_fractoin=0.3: no such setting (did you mean "
        "pseudo.cell_fraction?)"
    )
    assert len(error.splitlines()) == 1


def test_two_variants_of_one_output_folder_are_refused_before_any_runs(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(ablation, "run_postprocess", ran.append)
    variants = {"Threshold 0.3": ["pseudo=threshold"], "threshold (0,3)": ["pseudo=threshold"]}
    checkpoint = tmp_path / "final_model.pt"
    checkpoint.write_bytes(b"")
    overrides = [f"checkpoint={checkpoint}", "hospital=hospital_a"]
    with pytest.raises(JobError, match="would share the output folder threshold_0_3"):
        ablation.variant_configs(variants, overrides, tmp_path)
    assert ran == []


def test_the_classifier_is_scored_with_the_label_shift_it_was_trained_with(tmp_path) -> None:
    # At this strength the site's shift outweighs an untrained model's logits: the class
    # tokens name hospital_a's commonest training class for every cell.
    data = [f"data.hospitals.hospital_{h}.num_images=40" for h in "abc"]
    cfg = compose_config([*data, "train.logit_adjustment=100"])
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    checkpoint = save_model(model.state_dict(), cfg, 1, tmp_path / "final_model.pt")
    job = compose_config([*data, f"checkpoint={checkpoint}", "hospital=hospital_a"], "postprocess")
    labels = {s: hospital_split(cfg.data, "hospital_a", s).labels for s in ("train", "val", "test")}
    common = int(np.bincount(labels["train"]).argmax())
    expected = {s: float(np.mean(np.asarray(labels[s]) == common)) for s in ("val", "test")}
    assert ablation.classification_accuracy(job) == pytest.approx(expected)
