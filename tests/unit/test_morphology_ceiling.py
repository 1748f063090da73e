"""The leave-one-out ceiling: every image held out once from a probe fitted on the rest."""

import json

import torch

from benchmarks.morphology_ceiling import leave_one_out_accuracy, main


def test_leave_one_out_scores_separable_classes_fully_and_a_lone_class_member_never():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 8 + [1] * 8 + [2])
    features = torch.eye(3)[labels] * 4.0 + 0.2 * torch.randn(len(labels), 3)
    # The single class-2 image has no example left to learn its class from when held out.
    assert leave_one_out_accuracy(features, labels, 3, standardise=False, steps=100) == round(
        16 / 17, 3
    )


def test_one_line_per_hospital_and_size_on_a_synthetic_hospital(capsys):
    one_hospital = ["data.hospitals.hospital_a.num_images=10", "~data.hospitals.hospital_b"]
    assert main(["--sizes", "32", "48", "--", *one_hospital, "~data.hospitals.hospital_c"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["hospital"], r["size"]) for r in rows] == [("hospital_a", 32), ("hospital_a", 48)]
    assert all(r["images"] == 10 and 0.0 <= r["morphology"] <= 1.0 for r in rows)
