"""The feature probe: a balanced linear probe per pool, scored beside the model's own heads."""

import pytest
import torch

from benchmarks.feature_probe import PROBED, linear_probe, pixel_features, probe_hospital
from common.config import compose_config
from common.data import split_tensors
from common.model import create_mct_model


def test_the_probe_learns_a_rare_class_instead_of_answering_the_majority():
    torch.manual_seed(0)
    centres = torch.eye(3) * 3.0
    labels = torch.tensor([0] * 30 + [1] * 3 + [2] * 3)
    features = centres[labels] + 0.3 * torch.randn(len(labels), 3)
    probe = linear_probe(features, labels, 3)
    held_out = torch.tensor([0, 1, 2, 1, 2])
    assert torch.equal(probe(centres[held_out]).argmax(1), held_out)


def test_a_hospital_row_scores_both_heads_and_every_pool_on_each_split():
    cfg = compose_config([f"data.hospitals.hospital_{h}.num_images=40" for h in "abc"])
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    train = split_tensors(cfg.data, "hospital_a", "train", cfg.model.img_size)
    val = split_tensors(cfg.data, "hospital_a", "val", cfg.model.img_size)
    common = int(torch.bincount(train.labels).argmax())
    with torch.no_grad():  # the patch-CAM head now answers the training split's commonest class
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(common), 5))
    row = probe_hospital(model, train, {"val": val})
    share = float((val.labels == common).float().mean())
    assert row["majority_val"] == row["cam_val"] == pytest.approx(share, abs=1e-3)
    assert {f"probe_{p}_val" for p in PROBED} | {"tokens_val"} <= set(row)
    assert all(0.0 <= v <= 1.0 for v in row.values())


def test_pixel_features_tell_colours_apart_but_not_brightness():
    red = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    red[:, 0] = 200
    dim = red // 2
    blue = red.roll(2, dims=1)
    features = pixel_features(torch.cat([red, dim, blue]))
    assert features["histogram"].shape == (3, 512)
    # The histogram keeps brightness; the centred thumbnail of a uniform hue does not.
    assert not torch.allclose(features["histogram"][0], features["histogram"][1])
    assert torch.allclose(features["pixels"][0], features["pixels"][1], atol=1e-6)
    assert not torch.allclose(features["pixels"][0], features["pixels"][2])
