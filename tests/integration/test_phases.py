"""A real ``flwr run`` (w3s-simulate) of the issue-12 training recipe on the embedded default.

One run exercises the federated ``pretrain=instance`` phase before the MCT rounds (private
instance heads kept in each ClientApp's node state) and the foreground levers during the MCT
rounds, with their checkpoints and metrics rows, plus a hospital training with its own lever
strength (``train.per_hospital``), and the standardised input the final model keeps, with one
hospital on raw input (``model.per_hospital``). A second run exercises ``pretrain=masked``
(private pixel decoders) and checks that the MCT rounds start from its backbone.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_checkpoint, load_model
from support.flower_processes import metrics_rows, simulate

pytestmark = pytest.mark.integration

RECIPE = [
    "pretrain=instance",
    "pretrain.rounds=2",
    "pretrain.local_epochs=1",
    "federation.rounds=1",
    "model.foreground_head=true",
    "localization.source=foreground",
    "train.levers.foreground.suppression=1",
    "train.levers.foreground.area=0.5",
    "train.levers.foreground.contrast=1",
    "+train.per_hospital.hospital_b.levers.foreground.area=0",
    "+train.per_hospital.hospital_c.levers.foreground.size=10",
    "+train.per_hospital.hospital_c.levers.foreground.size_bounds=[0.2,0.5]",
    "+train.per_hospital.hospital_c.levers.foreground.compact=1",
    "model.standardise_input=channels",
    "+model.per_hospital.hospital_b.standardise_input=none",
    *[f"data.hospitals.hospital_{h}.num_images=30" for h in "abc"],
]


def pretrain_then_mct_rows(run_dir: Path) -> list[dict]:
    """The run's metrics rows, checked to be two pretraining rounds then one MCT round."""
    rows = metrics_rows(run_dir)
    phases = [(r["phase"], r["round"]) for r in rows]
    assert phases == [("pretrain", 1), ("pretrain", 2), ("mct", 1)]
    assert all(r["replies"] == 3 and not r["rejected"] for r in rows)
    return rows


def test_pretraining_phase_then_mct_rounds_with_foreground_levers(flwr_home, tmp_path):
    run_dir = tmp_path / "run"
    log = simulate(flwr_home, tmp_path, RECIPE, run_dir)

    rows = pretrain_then_mct_rows(run_dir)
    assert "val-loc-miou" in rows[-1]["evaluate"]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    # round_000 is the pretrained model the MCT rounds start from (two checkpoints are kept).
    assert names == [
        "pretrain_round_001.pt",
        "pretrain_round_002.pt",
        "round_000.pt",
        "round_001.pt",
    ]
    assert "pretrain round 2/2" in log and "mct round 1/1" in log
    assert "pretrain round 2: loss" in log  # a ClientApp ran the pretraining objective
    # One line a round from the recorder, none of Flower's (nor its table of every round).
    assert "[ROUND" not in log and "Aggregated MetricRecord" not in log
    model, payload = load_model(run_dir / "final_model.pt")
    assert payload["round"] == 1 and model.fg_head is not None
    assert model.standardise_input == "channels"
    raw, _ = load_model(run_dir / "final_model.pt", hospital="hospital_b")
    assert raw.standardise_input == "none"


def test_masked_pretraining_phase_keeps_its_decoder_at_each_hospital(flwr_home, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        "pretrain=masked",
        "pretrain.rounds=2",
        "pretrain.local_epochs=1",
        "federation.rounds=1",
        *[f"data.hospitals.hospital_{h}.num_images=30" for h in "abc"],
    ]
    log = simulate(flwr_home, tmp_path, overrides, run_dir)

    pretrain_then_mct_rows(run_dir)
    assert "pretraining: masked, 2 rounds" in log and "pretrain round 2: loss" in log
    # Each hospital's round line names where it trained, and on a CPU with how many threads.
    for hospital in ("hospital_a", "hospital_b", "hospital_c"):
        line = rf"hospital {hospital} pretrain round 2: loss \S+ on \d+ images in \S+s on "
        assert re.search(line + r"(cpu \(threads: \d+\)|cuda)", log), hospital
    # The MCT rounds start from the pretrained backbone, not from the seeded initialisation.
    checkpoints = run_dir / "checkpoints"
    start, pretrained = (
        load_checkpoint(checkpoints / name) for name in ("round_000.pt", "pretrain_round_002.pt")
    )
    assert all(torch.equal(start["state_dict"][k], v) for k, v in pretrained["state_dict"].items())
    # The hospitals' split fingerprints of the pretraining rounds go on with the MCT rounds.
    assert set(start["splits"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert start["splits"] == pretrained["splits"]
    assert all(len(digests) == 1 for digests in start["splits"].values())
