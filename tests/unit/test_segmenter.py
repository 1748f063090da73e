import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.augment import normalise
from common.checkpoint import CheckpointError, save_atomic
from common.metrics import IGNORE_INDEX
from common.segmenter import (
    ARCHITECTURES,
    Decoding,
    GroundTruthLeakError,
    SegmenterEnsemble,
    check_not_ground_truth,
    create_segmenter,
    input_logits,
    label_map,
    learning_rate_schedule,
    load_segmenter,
    native_logits,
    one_cell_logits,
    predict,
    recalibrate_batchnorm,
    segmenter_payload,
    train_segmenter,
    upsampled_strips,
)
from common.training import training_epochs

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


def test_a_seeded_segmenter_starts_from_the_same_weights_whatever_ran_before():
    first = create_segmenter(TINY, 3, seed=7).state_dict()
    torch.rand(1000)  # a job that drew random numbers before (a longer fine-tune, say)
    second = create_segmenter(TINY, 3, seed=7).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = create_segmenter(TINY, 3, seed=8).state_dict()
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_factory_loads_a_local_backbone_file(tmp_path, monkeypatch):
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large(weights=None)
    torch.save(classifier.state_dict(), tmp_path / "mobilenet.pth")
    monkeypatch.setenv("HOME", str(tmp_path))  # given from home, as the check reads it
    model = create_segmenter({**TINY, "backbone_weights_file": "~/mobilenet.pth"}, 3)
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
    assert cfg["one_cell_per_image"] is False
    again = predict(loaded, odd, 32, device=torch.device("cpu"))
    for a, b in zip(labels, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert cfg["test_time_augmentation"] is False
    voted = {**TINY, "one_cell_per_image": True, "test_time_augmentation": True}
    path = save_atomic(segmenter_payload(model, voted, ["a", "b"]), tmp_path / "voted.pt")
    assert load_segmenter(path)[1]["one_cell_per_image"] is True
    assert load_segmenter(path)[1]["test_time_augmentation"] is True
    assert Decoding.of(load_segmenter(path)[1]) == Decoding(one_cell=True, turned_views=True)
    assert Decoding.of({"arch": TINY["arch"], "input_size": 32}) == Decoding()  # an older file


class Lopsided(torch.nn.Module):
    """A fixed "segmenter" that misses cell in an image's right quarter: it has an orientation."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cell = (x.mean(1, keepdim=True) > 0).float()
        left = torch.zeros_like(cell)
        left[..., : 3 * x.shape[-1] // 4] = 1.0
        return {"out": torch.cat([1.0 - cell * left, cell * left], dim=1) * 4.0}


def test_turned_views_make_a_prediction_turn_with_its_image():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:24, 4:28] = 250  # a bright cell across both halves
    images = [image, np.ascontiguousarray(np.rot90(image)), np.ascontiguousarray(image[:, ::-1])]
    # Every cell pixel lies left of the cut in at least 6 of the 8 views: the mean finds it all.
    cpu = torch.device("cpu")
    plain = predict(Lopsided(), images, 32, device=cpu)
    assert plain[0][16, 6] == 1 and plain[0][16, 25] == 0  # the right quarter is lost
    turned = predict(Lopsided(), images, 32, device=cpu, decoding=Decoding(turned_views=True))
    assert turned[0][8:24, 4:28].all() and not turned[0][:8].any()
    np.testing.assert_array_equal(turned[1], np.rot90(turned[0]))
    np.testing.assert_array_equal(turned[2], turned[0][:, ::-1])
    logits = next(
        input_logits(Lopsided(), images[:1], 32, device=cpu, decoding=Decoding(turned_views=True))
    )
    assert torch.allclose(logits.exp().sum(0), torch.ones(32, 32), atol=1e-5)


def test_batches_without_a_labelled_pixel_make_no_step():
    torch.manual_seed(0)
    model = create_segmenter(TINY, 3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    ignored = [np.full((40, 40), IGNORE_INDEX, np.uint8) for _ in images]
    before = [p.detach().clone() for p in model.parameters()]
    losses = train_segmenter(model, images, ignored, TINY, device=torch.device("cpu"), seed=0)
    assert all(math.isnan(loss) for loss in losses)  # no batch to average, not a loss of 0
    # AdamW's momentum and weight decay would have moved the weights on no evidence.
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


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
    # More than half: 3 of 4 leaked masks are refused, 2 of 4 are not.
    with pytest.raises(GroundTruthLeakError, match="3 of 4"):
        check_not_ground_truth([*masks[:3], shrunk[3]], truth)
    check_not_ground_truth([*masks[:2], *shrunk[2:]], truth)
    # A leaked mask whose background is marked ignore still reproduces the cell.
    ignoring = [np.where(m > 0, m, IGNORE_INDEX).astype(np.uint8) for m in masks]
    with pytest.raises(GroundTruthLeakError, match="4 of 4"):
        check_not_ground_truth(ignoring, truth)
    # Crops without a cell: their empty pseudo-masks leak nothing, and are not counted.
    empty = [np.zeros_like(t) for t in truth]
    check_not_ground_truth([*empty[:3], shrunk[3]], [*empty[:3], truth[3]])
    with pytest.raises(GroundTruthLeakError, match="1 of 1"):
        check_not_ground_truth([*empty[:3], masks[3]], [*empty[:3], truth[3]])


def test_load_segmenter_errors_are_checkpoint_errors_naming_the_file(tmp_path):
    # Every case is in test_checkpoint.py; these are user errors (JobError), not bugs.
    with pytest.raises(CheckpointError, match="file not found"):
        load_segmenter(tmp_path / "missing.pt")
    save_atomic({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=f"segmenter={tmp_path / 'other.pt'} is not a"):
        load_segmenter(tmp_path / "other.pt")


@pytest.mark.parametrize("size", [(300, 170), (40, 50), (32, 32), (20, 10), (1, 7), (997, 3)])
def test_strips_match_bilinear_interpolation(size):
    torch.manual_seed(0)
    scores = torch.randn(4, 32, 32)
    full = F.interpolate(scores[None], size=size, mode="bilinear", align_corners=False)[0]
    strips = list(upsampled_strips(scores, size, strip_values=4 * size[1] * 7))  # 7 rows each
    assert [first for first, _ in strips] == list(range(0, size[0], 7))
    joined = torch.cat([strip for _, strip in strips], dim=1)
    torch.testing.assert_close(joined, full, rtol=0, atol=1e-4)
    # The strip height never changes a value: one strip and many strips agree bit for bit.
    whole = torch.cat([strip for _, strip in upsampled_strips(scores, size)], dim=1)
    assert torch.equal(joined, whole)
    labels = label_map(scores, size)
    assert labels.dtype == np.uint8 and labels.shape == size
    np.testing.assert_array_equal(labels, whole.argmax(0).numpy())


def test_label_map_ignores_the_pixels_below_the_confidence():
    scores = torch.zeros(2, 4, 4)
    scores[1, :2] = 5.0  # top half: class 1 at probability 0.993
    scores[0, 2:, :2] = 1.0  # bottom left: background at 0.73; bottom right: a tie
    plain = label_map(scores, (4, 4))
    assert plain[:2].tolist() == [[1] * 4] * 2 and plain[2:].tolist() == [[0] * 4] * 2
    sure = label_map(scores, (4, 4), confidence=0.9)
    np.testing.assert_array_equal(sure[:2], plain[:2])
    assert (sure[2:] == IGNORE_INDEX).all()
    middle = label_map(scores, (4, 4), confidence=0.6)
    assert middle[2:].tolist() == [[0, 0, IGNORE_INDEX, IGNORE_INDEX]] * 2


def test_predict_is_the_argmax_of_native_logits_without_building_them():
    torch.manual_seed(0)
    model = create_segmenter(TINY, 3).eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(70, 45), (31, 90)]]
    labels = predict(model, images, 32, device=torch.device("cpu"), batch_size=2)
    logits = list(native_logits(model, images, 32, device=torch.device("cpu"), batch_size=2))
    assert [tuple(scores.shape) for scores in logits] == [(3, 70, 45), (3, 31, 90)]
    for label, scores in zip(labels, logits, strict=True):
        np.testing.assert_array_equal(label, scores.argmax(0).numpy())


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


def test_one_cell_logits_give_the_cell_the_class_with_most_probability():
    background, first, second = 0.0, 1.0, 1.5
    logits = torch.tensor([background, first, second]).repeat(4, 4, 1).permute(2, 0, 1).clone()
    logits[:, 0] = torch.tensor([3.0, 0.0, 0.0])[:, None]  # top row: background
    logits[:, 1, :3] = torch.tensor([0.0, 2.0, 1.9])[:, None]  # class 1 wins these pixels alone
    plain = logits.argmax(0)
    assert set(plain[1:].unique().tolist()) == {1, 2}  # a per-pixel argmax splits the cell
    voted = one_cell_logits(logits)
    labels = voted.argmax(0)
    assert torch.equal(labels > 0, plain > 0)  # the vote changes the class, not the cell
    assert set(labels[plain > 0].unique().tolist()) == {2}  # class 2 holds more of the cell
    assert torch.isfinite(voted).all()
    torch.testing.assert_close(voted[0], logits.log_softmax(0)[0])


def test_one_cell_confidence_is_the_probability_that_decided_the_pixel():
    probabilities = torch.tensor([0.1, 0.7, 0.2]).repeat(2, 2, 1).permute(2, 0, 1).clone()
    probabilities[:, 0, 0] = torch.tensor([0.5, 0.3, 0.2])  # background, at 0.5 only
    probabilities[:, 1, 1] = torch.tensor([0.35, 0.05, 0.6])  # cell: class 2 at 0.6 beats 0.35
    voted = one_cell_logits(probabilities.log())
    plain = label_map(voted, (2, 2))
    assert plain.tolist() == [[0, 1], [1, 1]]  # class 1 holds most of the cell
    # Renormalised over background and the best class, the two would read 0.625 and 0.63.
    sure = label_map(voted, (2, 2), confidence=0.62, one_cell=True)
    assert sure.tolist() == [[IGNORE_INDEX, 1], [1, IGNORE_INDEX]]
    assert label_map(voted, (2, 2), confidence=0.45, one_cell=True).tolist() == plain.tolist()


def test_one_cell_logits_of_an_image_without_cell_pick_a_class_and_keep_background():
    logits = torch.zeros(4, 5, 5)
    logits[0] = 5.0
    logits[3] = 1.0
    voted = one_cell_logits(logits)
    assert torch.equal(voted.argmax(0), torch.zeros(5, 5, dtype=torch.long))
    assert int(voted.sum((1, 2)).argmax(0)) in (0, 3) and voted[3].max() > voted[1].max()


class SplitCell(torch.nn.Module):
    """A segmenter that finds a cell in the middle and splits it between classes 1 and 2."""

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        batch, _, height, width = images.shape
        logits = torch.zeros(batch, 3, height, width)
        logits[:, 0] = 2.0
        middle = (slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4))
        logits[:, 0, middle[0], middle[1]] = -2.0
        logits[:, 1, middle[0], middle[1]] = 1.0
        logits[:, 2, middle[0], width // 4 : width // 2] = 1.5  # class 2 wins less of the cell
        return {"out": logits}


def test_predict_with_one_cell_labels_each_image_with_a_single_class():
    images = [np.zeros((40, 48, 3), np.uint8), np.zeros((30, 30, 3), np.uint8)]
    plain = predict(SplitCell(), images, 32, device=torch.device("cpu"))
    voted = predict(
        SplitCell(), images, 32, device=torch.device("cpu"), decoding=Decoding(one_cell=True)
    )
    for split, single in zip(plain, voted, strict=True):
        assert set(np.unique(split).tolist()) == {0, 1, 2}
        assert set(np.unique(single).tolist()) == {0, 1}
        np.testing.assert_array_equal(single > 0, split > 0)


def test_poly_and_one_cycle_learning_rates():
    poly = learning_rate_schedule({"lr": 0.01}, total=10)
    assert poly(0) == 0.01 and poly(5) == pytest.approx(0.01 * 0.5**0.9)
    cycle = learning_rate_schedule({"lr": 0.01, "schedule": "one_cycle", "warmup": 0.2}, 10)
    rates = [cycle(step) for step in range(10)]
    assert rates[0] == pytest.approx(0.0004) and max(rates) == rates[2] == pytest.approx(0.01)
    assert rates[2:] == sorted(rates[2:], reverse=True) and rates[-1] < 0.001
    with pytest.raises(ValueError, match="segmenter.schedule"):
        learning_rate_schedule({"lr": 0.01, "schedule": "step"}, 10)


def test_an_ensembles_members_are_the_segmenters_of_consecutive_seeds(tmp_path):
    rng = np.random.default_rng(0)
    images, masks = cells(4, rng)
    cfg, cpu = {**TINY, "epochs": 1}, torch.device("cpu")
    assert len(create_segmenter({**cfg, "members": 3.0}, 3).members) == 3  # as Hydra may give it
    ensemble = create_segmenter({**cfg, "members": 2}, 3, seed=5)
    assert isinstance(ensemble, SegmenterEnsemble) and len(ensemble.members) == 2
    losses = train_segmenter(ensemble, images, masks, cfg, device=cpu, seed=5)
    for i, member in enumerate(ensemble.members):
        alone = create_segmenter(cfg, 3, seed=5 + i)
        alone_losses = train_segmenter(alone, images, masks, cfg, device=cpu, seed=5 + i)
        for key, value in alone.state_dict().items():
            torch.testing.assert_close(member.state_dict()[key], value)
        if i == 0:
            first_losses = alone_losses
    assert losses != first_losses  # the mean over both members, not the first one's
    batch = torch.rand(2, 3, 32, 32)
    ensemble.eval()
    with torch.no_grad():
        mean = torch.stack([m(batch)["out"].softmax(1) for m in ensemble.members]).mean(0)
        out = ensemble(batch)["out"]
    torch.testing.assert_close(out.exp(), mean)
    # Saved and loaded, it is the same ensemble and predicts the same labels.
    path = save_atomic(
        segmenter_payload(ensemble, {**cfg, "members": 2}, ["a", "b"]), tmp_path / "e.pt"
    )
    loaded, saved_cfg, _ = load_segmenter(path)
    assert isinstance(loaded, SegmenterEnsemble) and saved_cfg["members"] == 2
    for a, b in zip(
        predict(ensemble, images, 32, device=cpu),
        predict(loaded, images, 32, device=cpu),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("members", [0, -1, 1.5, float("nan"), float("inf"), "two", True])
def test_a_bad_member_count_is_refused_in_a_config_and_in_a_file(members, tmp_path):
    with pytest.raises(ValueError, match="segmenter.members"):
        create_segmenter({**TINY, "members": members}, 3)
    payload = segmenter_payload(create_segmenter(TINY, 3), TINY, ["a", "b"])
    payload["segmenter"]["members"] = members
    path = save_atomic(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"segmenter={path}: segmenter.members"):
        load_segmenter(path)
