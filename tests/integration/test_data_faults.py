"""A hospital's image file is truncated mid-run: it fails that round, the federation goes on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoint import load_checkpoint
from support.flower_processes import metrics_rows
from tests.integration.test_faults import _average_of_dumps, _run_fault_app

pytestmark = pytest.mark.integration

CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
IDENTIFYING_NAME = "patient_JaneRoe_77.png"


def _class_folder_hospital(root: Path) -> Path:
    """Four small PNGs per class folder, one named after a patient; return that one's path."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(4):
            image = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
            image.save(root / name / (IDENTIFYING_NAME if (c, i) == (0, 0) else f"{i:03d}.png"))
    return root / CLASSES[0] / IDENTIFYING_NAME


def test_a_file_truncated_mid_run_fails_that_hospital_and_the_round_closes(flwr_home, tmp_path):
    disk = tmp_path / "hospital_files"
    victim = _class_folder_hospital(disk)
    run_dir = tmp_path / "run"
    overrides = [
        "pretrain=none",
        "federation.rounds=2",
        "federation.min_replies=2",
        "train.warmup_epochs=0.5",
        "data.hospitals.hospital_a.num_images=60",
        "data.hospitals.hospital_b.num_images=60",
        # The third hospital reads real files from its own disk (partition 2).
        "~data.hospitals.hospital_c",
        f"+data.hospitals.hospital_files={{format:class_folders,root:{disk}}}",
        f"output_dir={run_dir}",
    ]
    result = _run_fault_app(
        flwr_home,
        tmp_path,
        overrides,
        corrupt_partition=2,
        corrupt_round=2,
        corrupt_file=str(victim),
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert victim.stat().st_size == 64  # the fault did happen

    rows = metrics_rows(run_dir)
    assert [r["replies"] for r in rows] == [3, 2]
    assert rows[0]["failed_nodes"] == []
    (node,) = rows[1]["failed_nodes"]
    reason = rows[1]["failures"][str(node)]
    assert "HospitalDataError" in reason
    assert "data verification failed: hospital_files: 1 truncated_image" in reason
    # Under simulation Ray wraps the error in its traceback (code paths only); no data path,
    # file name or class folder reaches the server.
    for leak in ("JaneRoe", str(disk), ".png", "neutrophil"):
        assert leak not in reason
    assert f"node {node} failed" in result.stdout

    # The round closed on the two survivors' replies, and the run went on to its final model.
    survivors = sorted((tmp_path / "dumps").glob("round2_partition*.pt"))
    assert [p.name for p in survivors] == ["round2_partition0.pt", "round2_partition1.pt"]
    expected = _average_of_dumps(survivors)
    final = load_checkpoint(run_dir / "final_model.pt")
    assert final["round"] == 2
    for key, tensor in final["state_dict"].items():
        torch.testing.assert_close(tensor.double(), expected[key], rtol=0, atol=1e-6)
