"""A real ``flwr run`` of the tiny default through w3s-simulate: 3 hospitals, 2 rounds."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import compose_config
from common.data import split_digest
from support.flower_processes import metrics_rows, simulate

pytestmark = pytest.mark.integration

# Small enough for 2 CPU cores, large enough for the loss to fall within 2 rounds. The
# federation's mechanics need no pretraining phase (test_phases.py runs it).
TINY = [
    "pretrain=none",
    "federation.rounds=2",
    "train.warmup_epochs=0.5",
    "data.hospitals.hospital_a.num_images=60",
    "data.hospitals.hospital_b.num_images=60",
    "data.hospitals.hospital_c.num_images=60",
]


def test_simulated_federation_trains_checkpoints_and_records(flwr_home, tmp_path):
    run_dir = tmp_path / "run"
    log = simulate(flwr_home, tmp_path, TINY, run_dir)

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replies"] == 3 and not r["failed_nodes"] and not r["rejected"] for r in rows)
    assert set(rows[0]["hospitals"]) == {"hospital_a", "hospital_b", "hospital_c"}
    assert rows[1]["train"]["train-loss"] < rows[0]["train"]["train-loss"]
    for key in ("val-map", "val-accuracy", "val-cam-accuracy", "val-loc-miou", "val-loc-threshold"):
        assert key in rows[1]["evaluate"]

    final = load_checkpoint(run_dir / "final_model.pt")
    latest = load_checkpoint(run_dir / "checkpoints" / "round_002.pt")
    assert final["round"] == 2 and latest["round"] == 2
    assert final["classes"] == ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    for key, tensor in final["state_dict"].items():
        assert torch.equal(tensor, latest["state_dict"][key])
        assert torch.isfinite(tensor).all()
    # Each hospital's split fingerprint, one per hospital, as post-training computes it there.
    data = compose_config(TINY).data
    assert final["splits"] == {
        name: [split_digest(data, name)] for name in ("hospital_a", "hospital_b", "hospital_c")
    }
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round_001.pt",
        "round_002.pt",
    ]
    assert f"run directory: {run_dir}" in log
    server_lines = [line for line in log.splitlines() if "server_app" in line]
    assert server_lines[-1].endswith(f"final model: {run_dir / 'final_model.pt'}")
    # The run's local SuperLink kept its state in a Flower home of its own (two runs on one
    # database fail each other's runs), removed once the run completed.
    assert not (flwr_home / "local-superlink").exists()
    assert list((flwr_home / "w3s-simulate").iterdir()) == []
