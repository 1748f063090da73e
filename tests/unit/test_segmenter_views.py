"""benchmarks/segmenter_views: one saved segmenter scored plain and with its turned views."""

import numpy as np
import torch
from omegaconf import OmegaConf

import benchmarks.segmenter_views as views
from benchmarks.segmenter_views import EVALUATED, score_views
from common.checkpoint import save_atomic
from common.config import compose_config
from common.data import hospital_split
from common.metrics import class_aware_truths
from common.segmenter import create_segmenter, segmenter_payload


def _same(images: list[np.ndarray], others: list[np.ndarray]) -> bool:
    return len(images) == len(others) and all(map(np.array_equal, images, others))


def test_a_job_folder_is_scored_both_ways_on_every_split(tmp_path, monkeypatch):
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
    truths = {}
    for split in EVALUATED:
        data = hospital_split(cfg.data, "hospital_a", split)
        truths[split] = (data.images, class_aware_truths(data.masks, data.labels))

    def predict(model, images, input_size, *, device, decoding):
        """The turned views decode each split's truth, the plain image all background."""
        assert input_size == cfg.segmenter.input_size
        (truth,) = [t for split_images, t in truths.values() if _same(split_images, images)]
        return truth if decoding.turned_views else [np.zeros_like(t) for t in truth]

    monkeypatch.setattr(views, "predict", predict)
    row = score_views(tmp_path)
    assert row["hospital"] == "hospital_a"
    for split in EVALUATED:
        assert row[f"turned_{split}"] == row[f"turned_{split}_class_aware"] == 100.0
        assert row[f"plain_{split}"] <= 50.0  # the cell's IoU is 0
        assert row[f"plain_{split}_class_aware"] < row[f"plain_{split}"]
