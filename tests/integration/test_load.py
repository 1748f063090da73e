"""Load: a tiny-model simulation with ten hospitals, through ``w3s-simulate`` and ``flwr run``."""

from __future__ import annotations

import json

import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import compose_config
from common.data import hospital_names
from tests.integration.flower_processes import BIN, flower_env, run

pytestmark = pytest.mark.integration

TEN = ["data=synthetic10", "federation.rounds=2", "train.local_epochs=1"]


def test_ten_hospitals_complete_every_round(flwr_home, tmp_path):
    hospitals = hospital_names(compose_config(TEN).data)
    assert len(hospitals) == 10
    run_dir = tmp_path / "run"
    result = run(
        [str(BIN / "w3s-simulate"), *TEN, f"output_dir={run_dir}"],
        env=flower_env(flwr_home),
        timeout_s=900,
        cwd=tmp_path,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "num-supernodes=10" in log

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replies"] == 10 and not r["failed_nodes"] and not r["rejected"] for r in rows)
    assert sorted(rows[-1]["hospitals"]) == hospitals
    final = load_checkpoint(run_dir / "final_model.pt")
    assert final["round"] == 2
    assert all(torch.isfinite(t).all() for t in final["state_dict"].values())
