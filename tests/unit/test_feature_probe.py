"""The feature probe: a balanced linear probe per pool, scored beside the model's own heads."""

import json

import pytest
import torch

from benchmarks.feature_probe import (
    MORPHOLOGY,
    PROBED,
    linear_probe,
    main,
    morphology_features,
    parse_arguments,
    pixel_features,
    pooled_morphology_probe,
    probe_hospital,
)
from benchmarks.head_refit import parse_arguments as head_refit_arguments
from common.checkpoint import save_model
from common.config import compose_config
from common.data import SplitTensors, split_tensors
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
    assert {f"probe_{p}_val" for p in (*PROBED, MORPHOLOGY)} | {"tokens_val"} <= set(row)
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


def test_a_standardised_probe_reads_features_in_unlike_units_as_given():
    torch.manual_seed(0)
    labels = torch.tensor([0] * 10 + [1] * 10)
    informative = labels.float() + 0.1 * torch.randn(20)  # in tenths
    features = torch.stack([informative, 1000.0 * torch.randn(20)], dim=1)  # noise in thousands
    probe = linear_probe(features, labels, 2, standardise=True)
    assert torch.equal(probe(features).argmax(1), labels)
    # The scaling lives in the returned weights: raw held-out features go in unchanged.
    held_out = torch.tensor([[0.0, 500.0], [1.0, -500.0]])
    assert torch.equal(probe(held_out).argmax(1), torch.tensor([0, 1]))


def test_morphology_counts_the_lobes_and_measures_the_nucleus_share():
    masks = torch.ones(2, 40, 40, dtype=torch.uint8)  # all cytoplasm
    masks[0, 10:30, 10:30] = 2  # one round nucleus: 400 px
    masks[1, 10:30, 8:16] = 2  # two lobes of 160 px each
    masks[1, 10:30, 24:32] = 2
    images = torch.zeros(2, 3, 40, 40, dtype=torch.uint8)
    images[:, 2][masks == 2] = 200  # blue nuclei in black cytoplasm
    features = morphology_features(images, masks)
    assert features.shape == (2, 17)
    assert features[0, 0].item() == pytest.approx(400 / 1600)
    assert features[1, 0].item() == pytest.approx(320 / 1600)
    assert features[:, 2].tolist() == [1.0, 2.0]  # lobes
    assert features[:, 3].tolist() == pytest.approx([1.0, 0.5])  # the largest lobe's share
    assert features[1, 4] > features[0, 4]  # the lobed outline is longer for its area
    assert features[0, 5:8].tolist() == pytest.approx([0.0, 0.0, 200 / 255])  # nucleus mean


def cells(nucleus_rows: list[int]) -> SplitTensors:
    """40x40 all-cytoplasm cells whose nucleus is that many rows of 20 pixels."""
    masks = torch.ones(len(nucleus_rows), 40, 40, dtype=torch.uint8)
    for mask, rows in zip(masks, nucleus_rows, strict=True):
        mask[10 : 10 + rows, 10:30] = 2
    images = torch.zeros(len(nucleus_rows), 3, 40, 40, dtype=torch.uint8)
    return SplitTensors(images, torch.zeros(len(nucleus_rows), dtype=torch.long), masks)


def test_a_pooled_morphology_probe_compares_sites_on_their_own_scales():
    # Class 1 has the larger nucleus at both sites, but the second site outlines every
    # nucleus larger: its class 0 is larger than the first site's class 1.
    sites = {}
    for site, (small, large) in {"a": (8, 12), "b": (14, 18)}.items():
        splits = {}
        for split, repeats in (("train", 6), ("val", 2)):
            data = cells([small, large] * repeats)
            data.labels[1::2] = 1
            splits[split] = data
        sites[site] = splits
    scores = pooled_morphology_probe(sites, 2)
    assert scores == {"a": {"val": 1.0}, "b": {"val": 1.0}}
    # Without each site's own scale, one boundary cannot separate both sites' classes.
    train = [s["train"] for s in sites.values()]
    raw = torch.cat([morphology_features(t.images, t.masks) for t in train])
    labels = torch.cat([t.labels for t in train])
    unscaled = linear_probe(raw, labels, 2, standardise=True)
    assert (unscaled(raw).argmax(1) == labels).float().mean() < 1.0


@pytest.mark.parametrize(
    ("parse", "argv"),
    [
        (parse_arguments, ["run", "--test", "--", "data=wbc_zxaoyou"]),
        (head_refit_arguments, ["run", "dataset2", "--test", "--", "data=wbc_zxaoyou"]),
    ],
)
def test_overrides_may_follow_an_option(parse, argv):
    args = parse(argv)
    assert args.test and args.overrides == ["data=wbc_zxaoyou"]


def test_a_model_file_is_probed_as_a_run_folder_is(tmp_path, capsys):
    overrides = [
        "data.hospitals.hospital_a.num_images=40",
        "~data.hospitals.hospital_b",
        "~data.hospitals.hospital_c",
    ]
    cfg = compose_config(overrides)
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    fine_tuned = save_model(model.state_dict(), cfg, 1, tmp_path / "personalized_model.pt")
    assert main([str(fine_tuned), "--", *overrides]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(row["run"], row["hospital"]) for row in rows] == [(str(fine_tuned), "hospital_a")]
    assert 0.0 <= rows[0]["cam_val"] <= 1.0


def test_both_heads_are_read_with_the_label_shift_the_model_was_trained_with(tmp_path, capsys):
    # At this strength the site's shift outweighs an untrained model's logits: both heads
    # name its commonest training class for every cell.
    overrides = [
        "data.hospitals.hospital_a.num_images=40",
        "~data.hospitals.hospital_b",
        "~data.hospitals.hospital_c",
    ]
    cfg = compose_config([*overrides, "train.logit_adjustment=100"])
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    adjusted = save_model(model.state_dict(), cfg, 1, tmp_path / "final_model.pt")
    assert main([str(adjusted), "--", *overrides]) == 0
    row = json.loads(capsys.readouterr().out)
    common = int(torch.bincount(split_tensors(cfg.data, "hospital_a", "train", 16).labels).argmax())
    val = split_tensors(cfg.data, "hospital_a", "val", 16).labels
    share = float((val == common).float().mean())
    assert row["cam_val"] == row["tokens_val"] == pytest.approx(share, abs=1e-3)
