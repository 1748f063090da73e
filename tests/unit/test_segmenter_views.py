"""benchmarks/segmenter_views: one saved segmenter scored plain and with its turned views."""

import torch
from omegaconf import OmegaConf

from benchmarks.segmenter_views import EVALUATED, score_views
from common.checkpoint import save_atomic
from common.config import compose_config
from common.segmenter import create_segmenter, segmenter_payload


def test_a_job_folder_is_scored_both_ways_on_every_split(tmp_path):
    cfg = compose_config(
        [
            "hospital=hospital_a",
            "segmenter=lraspp",
            *(f"data.hospitals.hospital_{h}.num_images=20" for h in "abc"),
        ],
        config_name="postprocess",
    )
    OmegaConf.save(cfg, tmp_path / "config.yaml")
    classes = list(cfg.data.classes)
    torch.manual_seed(0)
    model = create_segmenter(cfg.segmenter, len(classes) + 1)
    save_atomic(segmenter_payload(model, cfg.segmenter, classes), tmp_path / "segmenter.pt")
    row = score_views(tmp_path)
    assert row["hospital"] == "hospital_a"
    for split in EVALUATED:
        for decoding in ("plain", "turned"):
            assert 0.0 <= row[f"{decoding}_{split}"] <= 100.0
            assert 0.0 <= row[f"{decoding}_{split}_class_aware"] <= 100.0
