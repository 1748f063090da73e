"""Differential privacy options in real ``flwr run`` simulations of the tiny default."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from common.checkpoint import load_checkpoint
from server_app.privacy import PrivacyLedger, privacy_settings
from support.flower_processes import metrics_rows, simulate
from tests.integration.test_faults import _run_fault_app
from tests.integration.test_simulation import TINY

# TINY at 32 px, for the runs that only check the server's arithmetic.
TINY_32 = [*TINY, "model.img_size=32"]

pytestmark = pytest.mark.integration

CLIP = 0.01


def _simulate(flwr_home, tmp_path, *overrides: str) -> dict:
    """Run 2 rounds with ``overrides``; return the privacy record and the last global update."""
    run_dir = tmp_path / "run"
    log = simulate(flwr_home, tmp_path, [*TINY_32, *overrides], run_dir)
    rows = metrics_rows(run_dir)
    assert [r["replies"] for r in rows] == [3, 3]
    before = load_checkpoint(run_dir / "checkpoints" / "round_001.pt")["state_dict"]
    final = load_checkpoint(run_dir / "final_model.pt")
    after = final["state_dict"]
    squares = sum(((after[k].double() - before[k].double()) ** 2).sum() for k in after)
    # The split fingerprints would tell apart image sets one image apart: not released.
    assert final["splits"] == {}
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
    privacy = out["privacy"]
    assert privacy["name"] == "client_clip" and privacy["clipping_norm"] == CLIP
    # No noise: no finite epsilon, and every round is recorded with its replies.
    assert privacy["epsilon"] is None
    assert [(r["replies"], r["noise_stdev"]) for r in privacy["rounds"]] == [(3, 0.0), (3, 0.0)]
    assert 0 < out["update_norm"] <= CLIP * (1 + 1e-4)
    assert "differential privacy: client_clip" in out["log"]


def _zxaoyou_disk(root: Path) -> Path:
    """A tiny hospital in the zxaoyou layout: 4 BMPs (and masks) per class and its label file."""
    rng = np.random.default_rng(1)
    (root / "site").mkdir(parents=True)
    yy, xx = np.mgrid[:48, :48]
    disk = (((yy - 24) ** 2 + (xx - 24) ** 2) < 12**2).astype(np.uint8) * 255
    rows = ["image ID,class label"]
    for image_id in range(1, 21):
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "site" / f"{image_id:03d}.bmp")
        Image.fromarray(disk).save(root / "site" / f"{image_id:03d}.png")
        rows.append(f"{image_id},{(image_id - 1) % 5 + 1}")
    labels = root / "Class Labels of site.csv"
    labels.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return labels


def test_dp_with_a_hospital_failing_mid_run_keeps_the_noise_of_the_hospitals_asked(
    flwr_home, tmp_path
):
    # Server-side clipping; in round 2 the third hospital's label file loses a row (a missing
    # label appears mid-run), so it fails and the round closes on the other two. The two
    # clipped updates are summed over the 3 asked and the noise stays that of 3 (it must not
    # tell how many took part); privacy.json must account both rounds.
    labels = _zxaoyou_disk(tmp_path / "hospital_files")
    run_dir = tmp_path / "run"
    overrides = [
        *(o for o in TINY_32 if "hospital_c" not in o),
        "~data.hospitals.hospital_c",
        f"+data.hospitals.hospital_files={{format:zxaoyou,root:{labels.parent},subset:site}}",
        "federation.min_replies=2",
        "privacy=server_clip",
        "privacy.noise_multiplier=1.0",
        f"privacy.clipping_norm={CLIP}",
        f"output_dir={run_dir}",
    ]
    result = _run_fault_app(
        flwr_home,
        tmp_path,
        overrides,
        corrupt_partition=2,
        corrupt_round=2,
        corrupt_file=str(labels),
        corrupt_kind="drop-label",
    )
    log = result.stdout
    assert result.returncode == 0, log[-4000:]

    rows = metrics_rows(run_dir)
    assert [r["replies"] for r in rows] == [3, 2]
    (reason,) = rows[1]["failures"].values()
    # The train reply fails on the first missing row, the evaluate reply on a second one.
    assert "missing_label; run w3s-verify at this site" in reason
    assert str(labels.parent) not in reason and "Class Labels" not in reason

    record = json.loads((run_dir / "privacy.json").read_text())
    assert record["rounds"] == [
        {"round": 1, "replies": 3, "noise_stdev": pytest.approx(CLIP / 3), "noise_multiplier": 1.0},
        {"round": 2, "replies": 2, "noise_stdev": pytest.approx(CLIP / 3), "noise_multiplier": 1.0},
    ]
    ledger = PrivacyLedger(privacy_settings(_server_clip(), 3), tmp_path / "check.json")
    ledger.release(1, 3, CLIP / 3)
    ledger.release(2, 2, CLIP / 3)
    assert record["epsilon"] == pytest.approx(ledger.epsilon()) and record["delta"] == 1e-5
    assert f"epsilon {ledger.epsilon():.4g} at delta 1e-05 after 2 rounds" in log

    # Round 2's update is the two clipped updates over 3 (norm <= 2 CLIP / 3) plus noise of
    # stdev CLIP / 3 per parameter, whose norm over this many parameters is stdev *
    # sqrt(parameters) within 1%.
    before = load_checkpoint(run_dir / "checkpoints" / "round_001.pt")["state_dict"]
    after = load_checkpoint(run_dir / "final_model.pt")["state_dict"]
    squares = sum(((after[k].double() - before[k].double()) ** 2).sum() for k in after)
    noise_norm = CLIP / 3 * math.sqrt(sum(t.numel() for t in after.values()))
    assert abs(math.sqrt(float(squares)) - noise_norm) <= 2 * CLIP / 3 + 0.01 * noise_norm


def _server_clip():
    return OmegaConf.create(
        {"name": "server_clip", "noise_multiplier": 1.0, "clipping_norm": CLIP, "delta": 1e-5}
    )
