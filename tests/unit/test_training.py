"""Local training and validation on the synthetic hospitals with the tiny model."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from common.augment import build_train_transform, rand_augment, train_cache_size
from common.config import compose_config
from common.data import SplitTensors, split_tensors
from common.model import create_mct_model, mct_loss
from common.training import (
    evaluate_local,
    label_shift,
    learning_rate,
    mct_objective,
    shifted,
    site_label_shift,
    train_local,
    train_round,
)

SMALL = [f"data.hospitals.hospital_{h}.num_images=40" for h in "abc"]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = compose_config(["train.warmup_epochs=2"]).train
    assert learning_rate(cfg, 0, 10) == pytest.approx(cfg.warmup_lr)
    assert learning_rate(cfg, 1, 10) == pytest.approx((cfg.warmup_lr + cfg.lr) / 2)
    assert learning_rate(cfg, 2, 10) == pytest.approx(cfg.lr)
    assert learning_rate(cfg, 6, 10) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    assert learning_rate(cfg, 10, 10) == pytest.approx(cfg.min_lr)
    rates = [learning_rate(cfg, e / 4, 10) for e in range(41)]
    assert all(b >= a for a, b in zip(rates[:8], rates[1:9], strict=True))
    assert all(b <= a for a, b in zip(rates[8:-1], rates[9:], strict=True))


def test_linear_batch_scaling_matches_the_reference_rule():
    cfg = compose_config(["train.scale_lr_by_batch=true", "train.batch_size=64"]).train
    assert learning_rate(cfg, cfg.warmup_epochs, 100) == pytest.approx(cfg.lr * 64 / 512)


def test_train_transform_gives_normalised_model_sized_crops():
    cfg = compose_config([])
    transform = build_train_transform(cfg.train.augment, 96)
    image = torch.randint(
        0, 256, (3, train_cache_size(96), train_cache_size(96)), dtype=torch.uint8
    )
    out = transform(image)
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
    assert out.min() < 0 < out.max()


def test_randaugment_magnitude_is_in_tenths_of_each_operations_maximum_as_timm_reads_it():
    # timm's rand-m9 (DeiT, MCT): 0.9 of 30 degrees, 0.3 shear and 0.9 enhancement.
    augment = rand_augment({"randaugment_ops": 2, "randaugment_magnitude": 9})
    space = augment._AUGMENTATION_SPACE
    level = {
        op: float(space[op][0](augment.num_magnitude_bins, 96, 96)[augment.magnitude])
        for op in ("Rotate", "ShearX", "Brightness")
    }
    assert level["Rotate"] == pytest.approx(27.0)
    assert level["ShearX"] == pytest.approx(0.27)
    assert level["Brightness"] == pytest.approx(0.81)
    with pytest.raises(ValueError, match="randaugment_magnitude=12: expected a whole number"):
        rand_augment({"randaugment_ops": 2, "randaugment_magnitude": 12})


def test_the_paper_transform_erases_with_noise_and_keeps_the_model_size():
    cfg = compose_config(["experiment=paper", "train.augment.erasing_p=1.0"])
    assert list(cfg.train.augment.crop_scale) == [0.08, 1.0] and not cfg.train.augment.vflip
    transform = build_train_transform(cfg.train.augment, 64)
    torch.manual_seed(0)
    out = transform(torch.full((3, 73, 73), 128, dtype=torch.uint8))
    assert out.shape == (3, 64, 64)
    # A flat grey image stays flat under crops, flips and RandAugment's geometry up to its
    # fill; only erasing's noise gives it many distinct values.
    assert out.unique().numel() > 500


def test_local_training_lowers_the_loss_and_validation_reports_every_score():
    cfg = compose_config([*SMALL, "train.lr=1e-3", "train.warmup_epochs=0"])
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    train = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size))
    device = torch.device("cpu")
    kwargs = {"total_epochs": 8, "device": device, "seed": 0}
    epochs = compose_config([*SMALL, "train.local_epochs=4", "train.lr=1e-3"]).train
    first = train_local(model, train, epochs, start_epoch=0, **kwargs)
    second = train_local(model, train, epochs, start_epoch=4, **kwargs)
    assert first.num_examples == len(train.labels)
    assert second.loss < first.loss

    val = split_tensors(cfg.data, "hospital_a", "val", cfg.model.img_size)
    metrics = evaluate_local(model, val, cfg.localization, device=device)
    assert set(metrics) == {
        "val-loss",
        "val-accuracy",
        "val-cam-accuracy",
        "val-map",
        "val-loc-miou",
        "val-loc-threshold",
    }
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["val-loc-miou"] <= 1.0
    assert metrics["val-loc-threshold"] in list(cfg.localization.thresholds)


def test_validation_maps_follow_the_configured_factor_normalisation():
    cfg = compose_config([*SMALL, "localization=fused"])
    torch.manual_seed(0)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    val = split_tensors(cfg.data, "hospital_a", "val", cfg.model.img_size)
    scores = [
        evaluate_local(
            model,
            val,
            OmegaConf.merge(cfg.localization, {"minmax_factors": minmax}),
            device=torch.device("cpu"),
        )["val-loc-miou"]
        for minmax in (False, True)
    ]
    # The same model, other maps: min-maxing each factor before their product moves the score.
    assert scores[0] != pytest.approx(scores[1], abs=1e-3)


def test_the_cam_accuracy_is_the_patch_cam_heads_and_the_accuracy_the_class_tokens():
    cfg = compose_config(SMALL)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    val = split_tensors(cfg.data, "hospital_a", "val", cfg.model.img_size)
    counts = torch.bincount(val.labels, minlength=model.num_classes)
    rare = int(counts.argmin())
    with torch.no_grad():  # the patch-CAM head now says "rare" for every image
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(rare), model.num_classes))
    metrics = evaluate_local(model, val, cfg.localization, device=torch.device("cpu"))
    assert metrics["val-cam-accuracy"] == pytest.approx(float(counts[rare]) / len(val.labels))
    with torch.no_grad():
        model.head.bias.copy_(torch.nn.functional.one_hot(val.labels[0], model.num_classes))
    again = evaluate_local(model, val, cfg.localization, device=torch.device("cpu"))
    # Only the patch-CAM head changed: the class tokens' accuracy stays where it was.
    assert again["val-accuracy"] == metrics["val-accuracy"]
    assert again["val-cam-accuracy"] == pytest.approx(
        float((val.labels == val.labels[0]).float().mean())
    )


def test_a_hospital_trains_with_its_own_settings_and_the_others_with_the_shared_ones():
    frozen = ("lr=0", "min_lr=0", "warmup_lr=0")
    cfg = compose_config(
        [*SMALL, "train.local_epochs=1", *(f"+train.per_hospital.hospital_a.{k}" for k in frozen)]
    )
    size = train_cache_size(cfg.model.img_size)
    for hospital, index in (("hospital_a", 0), ("hospital_b", 1)):
        model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        data = split_tensors(cfg.data, hospital, "train", size)
        kwargs = {"server_round": 1, "hospital_index": index, "device": torch.device("cpu")}
        train_round(model, data, cfg, hospital=hospital, **kwargs)
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        trainable = [k for k, _ in model.named_parameters()]
        # hospital_a's own learning rate is 0: nothing moves; hospital_b trains as configured.
        assert (not set(changed) & set(trainable)) == (hospital == "hospital_a")


def test_empty_training_split_is_refused():
    cfg = compose_config(SMALL)
    model = create_mct_model(cfg.model, num_classes=5)
    empty = split_tensors(cfg.data, "hospital_a", "train", 8)
    empty = type(empty)(empty.images[:0], empty.labels[:0], None)
    with pytest.raises(ValueError, match="empty"):
        train_local(
            model,
            empty,
            cfg.train,
            start_epoch=0,
            total_epochs=1,
            device=torch.device("cpu"),
            seed=0,
        )


def test_paper_preset_takes_one_full_batch_step_at_224():
    images = [f"data.hospitals.hospital_{h}.num_images=110" for h in "abc"]
    cfg = compose_config(["experiment=paper", *images])
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size))
    assert len(train.labels) >= cfg.train.batch_size == 64
    result = train_local(
        model,
        train,
        cfg.train,
        start_epoch=0,
        total_epochs=cfg.federation.rounds,
        device=torch.device("cpu"),
        seed=0,
    )
    assert math.isfinite(result.loss)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "cls_token" in changed and "head.weight" in changed


def test_accuracy_and_precision_read_the_logits_past_where_float32_sigmoids_saturate():
    # Class token c gives every image a logit near 20 + 2c: class 4 wins everywhere, and every
    # sigmoid is exactly 1.0 in float32.
    cfg = compose_config([])
    torch.manual_seed(0)
    model = create_mct_model(cfg.model, 5)
    with torch.no_grad():
        logits = (20.0 + 2.0 * torch.arange(5.0))[None, :, None]
        model.cls_token.copy_(logits.expand(1, 5, model.embed_dim))
    images = torch.randint(0, 255, (10, 3, 96, 96), dtype=torch.uint8)
    labels = torch.tensor([4] * 8 + [0] * 2)
    with torch.no_grad():
        predicted = model.eval()(images.float() / 255).class_logits.argmax(1)
    expected = float((predicted == labels).float().mean())
    metrics = evaluate_local(
        model, SplitTensors(images, labels, None), cfg.localization, device=torch.device("cpu")
    )
    assert metrics["val-accuracy"] == pytest.approx(expected)
    assert expected > 0.5  # the probe is only worth it where the logits pick class 4


def test_the_label_shift_is_each_classes_smoothed_log_odds_at_the_site():
    shift = label_shift(torch.tensor([0, 0, 0, 1]), 3, 0.5)
    prior = torch.tensor([4.0, 2.0, 1.0]) / 7  # counts plus one
    assert torch.allclose(shift, 0.5 * torch.log(prior / (1 - prior)))
    assert label_shift(torch.tensor([0, 1]), 3, 0.0) is None


def test_each_hospital_shifts_by_its_own_labels_at_its_own_strength():
    cfg = compose_config(
        ["train.logit_adjustment=1", "+train.per_hospital.hospital_a.logit_adjustment=0"]
    )
    labels = torch.tensor([2, 2, 1])
    assert site_label_shift(cfg, "hospital_a", labels, 5) is None
    assert torch.equal(site_label_shift(cfg, "hospital_b", labels, 5), label_shift(labels, 5, 1.0))
    assert site_label_shift(None, "hospital_b", labels, 5) is None  # a file without its config
    assert site_label_shift(OmegaConf.create({"seed": 0}), "hospital_b", labels, 5) is None


def test_the_adjusted_objective_trains_both_classifiers_on_the_shifted_logits():
    cfg = compose_config(SMALL)
    torch.manual_seed(0)
    model = create_mct_model(cfg.model, num_classes=5).eval()
    images = torch.rand(4, 3, cfg.model.img_size, cfg.model.img_size)
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 5).float()
    shift = label_shift(torch.tensor([0, 0, 0, 1, 3]), 5, 1.0)
    with torch.no_grad():
        output = model(images)
        adjusted = mct_objective(cfg.train.levers, shift)(model, images, targets)
        plain = mct_objective(cfg.train.levers)(model, images, targets)
    # The foreground levers' terms are the same in both: only the MCT loss reads the shift.
    moved = mct_loss(shifted(output, shift), targets) - mct_loss(output, targets)
    assert float(adjusted - plain) == pytest.approx(float(moved), abs=1e-5)
    assert abs(float(moved)) > 0.01


def test_a_site_scores_with_its_own_label_shift_added_back():
    cfg = compose_config(SMALL)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    val = split_tensors(cfg.data, "hospital_a", "val", cfg.model.img_size)
    with torch.no_grad():  # the patch-CAM head now favours no class
        model.head.weight.zero_()
        model.head.bias.zero_()
    rare = int(torch.bincount(val.labels, minlength=5).argmin())
    shift = label_shift(torch.full((9,), rare), 5, 1.0)  # a site whose cells are all "rare"
    metrics = evaluate_local(model, val, cfg.localization, device=torch.device("cpu"), shift=shift)
    assert metrics["val-cam-accuracy"] == pytest.approx(float((val.labels == rare).float().mean()))


def test_local_training_reads_the_sites_logit_adjustment():
    # Past the warm-up, so that an epoch moves the weights by about the learning rate.
    cfg = compose_config([*SMALL, "train.local_epochs=1", "train.lr=1e-3", "train.warmup_epochs=0"])
    train = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size))

    def trained_head(strength: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = create_mct_model(cfg.model, num_classes=5)
        settings = OmegaConf.merge(cfg.train, {"logit_adjustment": strength})
        kwargs = {"start_epoch": 0, "total_epochs": 1, "device": torch.device("cpu"), "seed": 0}
        train_local(model, train, settings, **kwargs)
        return model.head.weight.detach().clone()

    plain = trained_head(0.0)
    assert torch.equal(trained_head(0.0), plain)  # the step is deterministic, so a change is
    assert not torch.allclose(trained_head(1.0), plain, rtol=0, atol=1e-4)  # the shift's
