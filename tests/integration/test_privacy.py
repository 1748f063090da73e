"""Differential privacy options in real ``flwr run`` simulations of the tiny default."""

from __future__ import annotations

import json
import math

import pytest

from common.checkpoint import load_checkpoint
from support.flower_processes import metrics_rows, simulate
from tests.integration.test_simulation import TINY

pytestmark = pytest.mark.integration

CLIP = 0.01


def _simulate(flwr_home, tmp_path, *overrides: str) -> dict:
    """Run 2 rounds with ``overrides``; return the privacy record and the last global update."""
    run_dir = tmp_path / "run"
    log = simulate(flwr_home, tmp_path, [*TINY, *overrides], run_dir)
    rows = metrics_rows(run_dir)
    assert [r["replies"] for r in rows] == [3, 3]
    before = load_checkpoint(run_dir / "checkpoints" / "round_001.pt")["state_dict"]
    after = load_checkpoint(run_dir / "final_model.pt")["state_dict"]
    squares = sum(((after[k].double() - before[k].double()) ** 2).sum() for k in after)
    return {
        "privacy": json.loads((run_dir / "privacy.json").read_text()),
        "update_norm": math.sqrt(float(squares)),
        "parameters": sum(t.numel() for t in after.values()),
        "log": log,
    }


def test_client_side_clipping_bounds_the_global_update(flwr_home, tmp_path):
    # Without noise, the average of updates each clipped to CLIP has a norm of at most CLIP;
    # without privacy the round-2 update of this run measured about 0.6.
    out = _simulate(
        flwr_home,
        tmp_path,
        "privacy=client_clip",
        "privacy.noise_multiplier=0",
        f"privacy.clipping_norm={CLIP}",
    )
    assert out["privacy"] == {
        "name": "client_clip",
        "noise_multiplier": 0.0,
        "clipping_norm": CLIP,
        "num_sampled_clients": 3,
        "noise_stdev": 0.0,
    }
    assert 0 < out["update_norm"] <= CLIP * (1 + 1e-4)
    assert "differential privacy: client_clip" in out["log"]


def test_server_side_clipping_adds_noise_of_the_configured_scale(flwr_home, tmp_path):
    out = _simulate(
        flwr_home,
        tmp_path,
        "privacy=server_clip",
        "privacy.noise_multiplier=1.0",
        f"privacy.clipping_norm={CLIP}",
    )
    stdev = out["privacy"]["noise_stdev"]
    assert stdev == pytest.approx(CLIP / 3)
    # The update is the clipped average (norm <= CLIP) plus Gaussian noise, whose norm over
    # this many parameters is stdev * sqrt(parameters) to within a fraction of a percent.
    noise_norm = stdev * math.sqrt(out["parameters"])
    assert abs(out["update_norm"] - noise_norm) <= CLIP + 0.01 * noise_norm
