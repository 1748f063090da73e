"""Load: a tiny-model simulation with ten hospitals, through ``w3s-simulate`` and ``flwr run``."""

from __future__ import annotations

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import compose_config
from common.data import hospital_names
from support.flower_processes import metrics_rows, simulate

pytestmark = pytest.mark.integration

TEN = ["data=synthetic10", "pretrain=none", "federation.rounds=2", "train.local_epochs=1"]


def test_ten_hospitals_complete_every_round(flwr_home, tmp_path):
    hospitals = hospital_names(compose_config(TEN).data)
    assert len(hospitals) == 10
    run_dir = tmp_path / "run"
    log = simulate(flwr_home, tmp_path, TEN, run_dir)
    assert "num-supernodes=10" in log

    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replies"] == 10 and not r["failed_nodes"] and not r["rejected"] for r in rows)
    assert sorted(rows[-1]["hospitals"]) == hospitals
    final = load_checkpoint(run_dir / "final_model.pt")
    assert final["round"] == 2
    assert all(torch.isfinite(t).all() for t in final["state_dict"].values())
