import socket

import numpy as np
import pytest
import torch

from common.augment import normalise
from common.checkpoint import save_atomic
from common.segmenter import (
    ARCHITECTURES,
    GroundTruthLeakError,
    check_not_ground_truth,
    create_segmenter,
    load_segmenter,
    predict,
    recalibrate_batchnorm,
    segmenter_payload,
    train_segmenter,
    training_epochs,
)

TINY = {
    "arch": "lraspp_mobilenet_v3_large",
    "backbone_weights_file": None,
    "input_size": 32,
    "epochs": 2,
    "batch_size": 2,
    "optimizer": "adamw",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 1e-4,
}


def cells(count: int, rng: np.random.Generator, size: int = 40):
    """Dark discs on light images, labelled with class 1 or 2 (pseudo-mask style)."""
    images, masks = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2
        image = np.full((size, size, 3), 220, np.uint8)
        image[disc] = rng.integers(40, 90, 3)
        images.append(image)
        masks.append(np.where(disc, 1 + i % 2, 0).astype(np.uint8))
    return images, masks


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_factory_builds_every_arch_offline(arch, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = create_segmenter({"arch": arch}, num_outputs=6).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))["out"]
    assert out.shape == (2, 6, 64, 64)


def test_factory_rejects_unknown_arch_and_missing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        create_segmenter({"arch": "unet"}, 3)
    with pytest.raises(FileNotFoundError, match="backbone_weights_file"):
        create_segmenter({**TINY, "backbone_weights_file": str(tmp_path / "x.pth")}, 3)


def test_factory_loads_a_local_backbone_file(tmp_path):
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large(weights=None)
    path = tmp_path / "mobilenet.pth"
    torch.save(classifier.state_dict(), path)
    model = create_segmenter({**TINY, "backbone_weights_file": str(path)}, 3)
    torch.testing.assert_close(
        model.backbone.state_dict()["0.0.weight"], classifier.state_dict()["features.0.0.weight"]
    )


def test_training_on_pseudo_masks_learns_and_predicts_any_size(tmp_path):
    rng = np.random.default_rng(0)
    images, masks = cells(6, rng)
    masks[0][:2] = 255  # uncertain pixels are ignored
    torch.manual_seed(0)
    model = create_segmenter(TINY, 3)
    losses = train_segmenter(
        model, images, masks, {**TINY, "epochs": 6}, device=torch.device("cpu"), seed=0
    )
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    odd = [images[0][:30, :36], np.full((50, 20, 3), 200, np.uint8)]
    labels = predict(model, odd, 32, device=torch.device("cpu"), batch_size=2)
    assert [label.shape for label in labels] == [(30, 36), (50, 20)]
    assert all(label.dtype == np.uint8 and label.max() <= 2 for label in labels)

    path = save_atomic(segmenter_payload(model, TINY, ["a", "b"]), tmp_path / "segmenter.pt")
    loaded, cfg, classes = load_segmenter(path)
    assert classes == ["a", "b"] and cfg["input_size"] == 32
    again = predict(loaded, odd, 32, device=torch.device("cpu"))
    for a, b in zip(labels, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_min_steps_raises_the_epochs_of_a_small_hospital():
    assert training_epochs({"epochs": 2, "min_steps": 10}, steps_per_epoch=3) == 4
    assert training_epochs({"epochs": 5, "min_steps": 10}, steps_per_epoch=3) == 5
    assert training_epochs({"epochs": 2}, steps_per_epoch=3) == 2  # older segmenter configs
    images, masks = cells(4, np.random.default_rng(1))
    model = create_segmenter(TINY, 3)
    cfg = {**TINY, "epochs": 1, "min_steps": 6}  # 4 images at batch 2: 2 steps per epoch
    losses = train_segmenter(model, images, masks, cfg, device=torch.device("cpu"), seed=0)
    assert len(losses) == 3


def test_batch_norm_needs_batches_of_two():
    rng = np.random.default_rng(0)
    images, masks = cells(3, rng)
    model = create_segmenter(TINY, 3)
    with pytest.raises(ValueError, match="batch_size"):
        train_segmenter(
            model, images, masks, {**TINY, "batch_size": 1}, device=torch.device("cpu"), seed=0
        )
    with pytest.raises(ValueError, match="at least 2"):
        train_segmenter(model, images[:1], masks[:1], TINY, device=torch.device("cpu"), seed=0)


def test_ground_truth_guard():
    rng = np.random.default_rng(0)
    images, masks = cells(4, rng)
    truth = [np.where(m > 0, 2, 0).astype(np.uint8) for m in masks]  # nucleus codes
    with pytest.raises(GroundTruthLeakError, match="4 of 4"):
        train_segmenter(
            create_segmenter(TINY, 3),
            images,
            masks,
            TINY,
            device=torch.device("cpu"),
            seed=0,
            ground_truth=truth,
        )
    shrunk = [m.copy() for m in masks]
    for m in shrunk:
        m[m.shape[0] // 2] = 0  # a weak mask is never pixel-exact
    check_not_ground_truth(shrunk, truth)
    check_not_ground_truth(masks, None)


def test_load_segmenter_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_segmenter(tmp_path / "missing.pt")
    save_atomic({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a segmenter"):
        load_segmenter(tmp_path / "other.pt")


def test_recalibration_replaces_stale_batchnorm_statistics():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.01))
    model[1].running_mean.fill_(100.0)  # stale, as after a short from-scratch training
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    recalibrate_batchnorm(model, images, batch_size=2, device=torch.device("cpu"))
    with torch.no_grad():
        features = model[0](normalise(images))
    torch.testing.assert_close(model[1].running_mean, features.mean((0, 2, 3)))
    assert model[1].momentum == 0.01 and not model.training
