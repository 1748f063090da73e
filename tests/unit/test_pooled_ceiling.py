"""benchmarks/pooled_ceiling: the target's cells counted for a local and a pooled segmenter."""

import json

import pytest

from benchmarks.pooled_ceiling import main, summed_over_folds

SMALL = [
    "segmenter=lraspp",
    "segmenter.epochs=1",
    "data.split.folds=3",
    *(f"data.hospitals.hospital_{h}.num_images=12" for h in "ab"),
    "~data.hospitals.hospital_c",
]


def test_local_and_pooled_rows_then_sums_over_the_folds(capsys):
    assert main(["--target", "hospital_b", "--folds", "0", "1", "--", *SMALL]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runs, sums = lines[:4], lines[4:]
    assert [(r["fold"], r["trained_on"], r["hospitals"]) for r in runs] == [
        (0, "local", ["hospital_b"]),
        (0, "pooled", ["hospital_a", "hospital_b"]),
        (1, "local", ["hospital_b"]),
        (1, "pooled", ["hospital_a", "hospital_b"]),
    ]
    for run in runs:
        assert sorted(run["scores"]) == [f"hospital_{h}_{s}" for h in "ab" for s in ("test", "val")]
        for cells in run["scores"].values():
            assert 0 <= cells["right"] <= cells["cells"] > 0
            assert 0.0 <= cells["binary_miou"] <= 100.0
        # hospital_b's 12 images fall into 3 folds of 4 (validation and test are one each).
        assert (
            run["scores"]["hospital_b_val"]["cells"]
            == run["scores"]["hospital_b_test"]["cells"]
            == 4
        )
    local_test = next(
        s for s in sums if (s["trained_on"], s["scored_at"]) == ("local", "hospital_b_test")
    )
    assert local_test["cells"] == 8
    assert local_test["right"] == sum(r["scores"]["hospital_b_test"]["right"] for r in runs[::2])
    assert len(sums) == 2 * 4  # training sets x (hospital, split), one seed


def test_sums_keep_seeds_apart():
    rows = [
        {"trained_on": "pooled", "seed": seed, "scores": {"a_val": {"right": right, "cells": 5}}}
        for seed, right in ((0, 2), (0, 3), (1, 4))
    ]
    assert [
        (s["seed"], s["right"], s["cells"], s["accuracy"]) for s in summed_over_folds(rows)
    ] == [
        (0, 5, 10, 0.5),
        (1, 4, 5, 0.8),
    ]


def test_an_unknown_target_is_named():
    with pytest.raises(ValueError, match="'hospital_z' is not one of the hospitals"):
        main(["--target", "hospital_z", "--", *SMALL])
