"""``w3s-experiment`` + ``w3s-report`` end to end on a tiny configuration, as a user runs them.

Two synthetic hospitals, 32 px model, 2 rounds, one seed; regimes local_only (in process),
fedavg with half-precision transport (a real ``flwr run``) and the supervised ceiling; a rerun
of a finished regime is skipped.
"""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from support.flower_processes import BIN, flower_env, run

pytestmark = pytest.mark.integration

TINY = [
    "seeds=[0]",
    "pretrain=none",
    "~data.hospitals.hospital_c",
    "model.img_size=32",
    "federation.rounds=2",
    "train.local_epochs=1",
    "train.batch_size=8",
    *(f"data.hospitals.hospital_{h}.{k}" for h in "ab" for k in ("num_images=30", "image_size=48")),
    'postprocess=["segmenter=lraspp","segmenter.epochs=1","segmenter.input_size=32",'
    '"batch_size=8","evaluation.thresholds=[0.2,0.4,0.6]","evaluation.disk_radii=[0.5,0.7]"]',
]
REGIMES = [
    ["regime=local_only"],
    ["regime=fedavg", "federation.transport_dtype=float16", "label=fedavg_fp16"],
    ["regime=supervised"],
]


def test_experiments_and_report_end_to_end(flwr_home, tmp_path):
    runs = tmp_path / "runs"
    env = flower_env(flwr_home)
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: more threads only wait on each other
    for regime in REGIMES:
        result = run(
            [str(BIN / "w3s-experiment"), *regime, *TINY, f"runs_dir={runs}"],
            env=env,
            timeout_s=600,
            cwd=tmp_path,
        )
        assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    fed = json.loads((runs / "fedavg_fp16" / "seed_0" / "results.json").read_text())
    assert fed["hospitals"] == ["hospital_a", "hospital_b"]
    assert set(fed["rows"][0]["cells"]["hospital_b"]) >= {"segmenter", "pseudo_masks"}
    assert 0 <= fed["rows"][0]["cells"]["hospital_b"]["segmenter"]["cell_type"] <= 1
    assert "cell_type" not in fed["rows"][0]["cells"]["hospital_b"]["pseudo_masks"]
    rows = [
        json.loads(line)
        for line in (runs / "fedavg_fp16" / "seed_0" / fed["metrics_jsonl"])
        .read_text()
        .splitlines()
    ]
    assert [r["round"] for r in rows] == [1, 2]
    for hospital in ("hospital_a", "hospital_b"):
        per_round = rows[-1]["hospitals"][hospital]
        assert "val-loc-miou" in per_round
        # fp16 replies: the upload is about half of what the server sends (train + evaluate).
        assert 0 < per_round["bytes-received"] < 0.3 * per_round["bytes-sent"]
    local = json.loads((runs / "local_only" / "seed_0" / "results.json").read_text())
    assert [r["row"] for r in local["rows"]] == [
        "local_only (hospital_a)",
        "local_only (hospital_b)",
    ]
    assert (local["fold"], local["seed"]) == (None, 0)

    # A rerun keeps the finished seed: it logs the skip and trains nothing.
    result = run(
        [str(BIN / "w3s-experiment"), *REGIMES[0], *TINY, f"runs_dir={runs}"],
        env=env,
        timeout_s=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "skipped, finished before" in result.stdout + result.stderr
    rerun = json.loads((runs / "local_only" / "seed_0" / "results.json").read_text())
    assert rerun == local

    output, figures = tmp_path / "EXPERIMENTS.md", tmp_path / "figures"
    result = run(
        [str(BIN / "w3s-report"), f"runs=[{runs}]", f"output={output}", f"figures={figures}"],
        env=env,
        timeout_s=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    text = output.read_text()
    for expected in (
        "| local_only (hospital_b) |",
        "| fedavg_fp16 |",
        "| supervised (hospital_a) |",
        "local-only trained here",
        "of the ceiling, 1 shared run)",
        "final training loss",
        "| fedavg_fp16 | hospital_a | segmenter | binary | 1 |",
        "Compute: 3 runs,",
        "| fedavg_fp16 | hospital_a |",
    ):
        assert expected in text
    cell_types = text.split("### Cell types: segmenter")[1].split("###")[0]
    for row in ("| local_only (hospital_a) |", "| fedavg_fp16 |", "| supervised (hospital_b) |"):
        assert row in cell_types
    assert "baseline" not in cell_types
    for kind in ("matrix", "convergence", "overlays"):
        png = figures / f"synthetic_{kind}.png"
        assert f"]({os.path.relpath(png, tmp_path)})" in text
        with Image.open(png) as image:
            assert image.width > 100 and image.height > 100
