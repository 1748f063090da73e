import math

import numpy as np
import pytest
import torch

from common.pseudo import (
    METHODS,
    AttentionWalkMasker,
    Background,
    MapRecord,
    PSAMasker,
    StainGrowMasker,
    ThresholdMasker,
    argmax_labels,
    create_masker,
    stack_background,
    threshold_labels,
)
from common.pseudo.attn_rw import symmetric_affinity
from common.pseudo.psa import (
    AffinityNet,
    affinity_loss,
    confident_labels,
    dense_affinity,
    pair_labels,
    pair_offsets,
    radius_pairs,
)
from common.pseudo.stain_grow import rgb_to_lab
from common.pseudo.walk import transition_matrix, walk_on_grid

# Three nodes in a chain: 0 - 1 - 2.
CHAIN = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])


def test_transition_matrix_beta_column_normalisation_and_squaring():
    # W = CHAIN^2 = [[1, .25, 0], [.25, 1, .25], [0, .25, 1]], column sums 1.25 / 1.5 / 1.25
    one_step = transition_matrix(CHAIN, beta=2, logt=0)
    expected = torch.tensor([[0.8, 1 / 6, 0.0], [0.2, 2 / 3, 0.2], [0.0, 1 / 6, 0.8]])
    torch.testing.assert_close(one_step, expected)
    # logt = 1 -> t = 2 steps: T @ T, worked out by hand
    two_steps = transition_matrix(CHAIN, beta=2, logt=1)
    expected_two = torch.tensor(
        [
            [101 / 150, 11 / 45, 1 / 30],
            [22 / 75, 23 / 45, 22 / 75],
            [1 / 30, 11 / 45, 101 / 150],
        ]
    )
    torch.testing.assert_close(two_steps, expected_two)
    torch.testing.assert_close(two_steps.sum(0), torch.ones(3))


def test_walk_keeps_a_constant_background_and_spreads_classes():
    transition = transition_matrix(CHAIN, beta=2, logt=1)
    scores = torch.tensor([[0.3, 0.3, 0.3], [1.0, 0.0, 0.0]])[:, None, :]  # (K, 1, 3) grid
    walked = walk_on_grid(scores, transition, (1, 3), (1, 3))
    torch.testing.assert_close(walked[0, 0], torch.full((3,), 0.3))
    torch.testing.assert_close(walked[1, 0], torch.tensor([101 / 150, 11 / 45, 1 / 30]))


def test_transition_matrix_keeps_a_node_of_faint_affinities_a_walk():
    faint = CHAIN.clone()
    faint[:, 2] = torch.tensor([0.0, 5e-5, 1e-4])  # node 2 attends to almost nothing
    transition = transition_matrix(faint, beta=8, logt=0)
    # (1e-4)^8 underflows float32; the column still sums to one and keeps its shape.
    torch.testing.assert_close(transition.sum(0), torch.ones(3))
    torch.testing.assert_close(transition[:, 2], torch.tensor([0.0, 1 / 257, 256 / 257]))
    torch.testing.assert_close(transition[:, :2], transition_matrix(CHAIN, 8, 0)[:, :2])


def test_transition_matrix_rejects_negative_logt():
    with pytest.raises(ValueError, match="logt"):
        transition_matrix(CHAIN, beta=1, logt=-1)


def test_pair_offsets_radius_5_are_psas_34():
    offsets = pair_offsets(5)
    assert len(offsets) == 34 == len(set(offsets))
    assert offsets[:4] == [(0, 1), (0, 2), (0, 3), (0, 4)]
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)
    assert (4, 3) not in offsets and (4, 2) in offsets and (3, -3) in offsets
    # one direction only: no offset together with its opposite
    assert not any((-dy, -dx) in offsets for dy, dx in offsets)


def test_radius_pairs_radius_2_are_the_eight_neighbourhood_edges():
    sources, targets = radius_pairs(3, 3, 2)
    pairs = {tuple(sorted(p)) for p in zip(sources.tolist(), targets.tolist(), strict=True)}
    assert len(pairs) == len(sources) == 20  # 12 orthogonal + 8 diagonal edges
    assert (0, 4) in pairs and (2, 4) in pairs and (0, 2) not in pairs


def test_pair_labels_bg_fg_neg_and_ignore():
    # 2 x 3 grid, flat indices 0..5; labels: [[0, 0, 1], [255, 2, 1]]
    labels = torch.tensor([[[0, 0, 1], [255, 2, 1]]], dtype=torch.uint8)
    sources, targets = radius_pairs(2, 3, 2)
    bg, fg, neg = pair_labels(labels, sources, targets)

    def picked(mask):
        triples = zip(sources.tolist(), targets.tolist(), mask[0].tolist(), strict=True)
        return {(s, t) for s, t, m in triples if m}

    assert picked(bg) == {(0, 1)}
    assert picked(fg) == {(2, 5)}
    assert picked(neg) == {(1, 2), (4, 5), (2, 4), (1, 4), (0, 4), (1, 5)}
    touching_255 = {(1, 3), (0, 3), (3, 4)}
    assert not touching_255 & (picked(bg) | picked(fg) | picked(neg))


def test_confident_labels_low_and_high_background_exponents():
    # one class, v = [1, .5, 0]: background (1 - v)^1 = [0, .5, 1], (1 - v)^4 = [0, .0625, 1]
    # low: [cell, tie -> background, background]; high: [cell, cell, background]
    maps = torch.tensor([[[1.0, 0.5, 0.0]]])
    labels = confident_labels(maps, (1, 3), alpha_low=1, alpha_high=4)
    assert labels.tolist() == [[1, 255, 0]]


def test_affinity_loss_quarter_quarter_half():
    affinity = torch.tensor([[0.5, 0.9, 0.1, 0.7]])
    bg = torch.tensor([[True, False, False, False]])
    fg = torch.tensor([[False, True, False, False]])
    neg = torch.tensor([[False, False, True, False]])
    loss = affinity_loss(affinity, bg, fg, neg)
    expected = (
        -math.log(0.5 + 1e-5) / (1 + 1e-5) / 4
        - math.log(0.9 + 1e-5) / (1 + 1e-5) / 4
        - math.log(1 + 1e-5 - 0.1) / (1 + 1e-5) / 2
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    empty = torch.zeros_like(bg)
    assert affinity_loss(affinity, empty, empty, neg).item() == pytest.approx(
        -math.log(1 + 1e-5 - 0.1) / (1 + 1e-5) / 2, rel=1e-5
    )


def test_dense_affinity_is_symmetric_with_unit_diagonal():
    dense = dense_affinity(torch.tensor([0.5, 0.25]), torch.tensor([0, 1]), torch.tensor([1, 2]), 3)
    torch.testing.assert_close(
        dense, torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.0]])
    )


def test_affinity_net_is_a_stride_8_pyramid():
    net = AffinityNet("resnet18").eval()
    with torch.no_grad():
        features = net(torch.randn(2, 3, 32, 40))
    assert features.shape == (2, 448, 4, 5)
    assert (features >= -1).all()  # ELU output
    with pytest.raises(ValueError, match="backbone"):
        AffinityNet("vgg16")


def record(rng: np.random.Generator, label: int, size: int = 32, num_classes: int = 3) -> MapRecord:
    image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    maps = torch.zeros(num_classes, size, size)
    maps[label, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    return MapRecord(image, label, maps, torch.rand(16, 16), (4, 4))


def test_stack_background_and_label_maps():
    maps = torch.tensor([[[0.2, 0.9]], [[0.0, 0.0]]])
    stacked = stack_background(maps, Background("constant", 0.5))
    assert argmax_labels(stacked).tolist() == [[0, 1]]
    assert threshold_labels(maps, 0.1).tolist() == [[1, 1]]
    power = stack_background(maps, Background("power", alpha=2))
    torch.testing.assert_close(power[0], torch.tensor([[0.64, 0.01]]))
    with pytest.raises(ValueError, match="choose it on validation"):
        stack_background(maps, Background())
    with pytest.raises(ValueError, match="kind"):
        Background("learned")


def test_threshold_is_identity_and_attn_rw_keeps_constants():
    rng = np.random.default_rng(0)
    records = [record(rng, 0), record(rng, 2)]
    scores = [torch.cat([torch.full((1, 32, 32), 0.4), r.maps]) for r in records]
    assert ThresholdMasker().propagate(records, scores) == scores
    walked = AttentionWalkMasker(beta=8, logt=2).propagate(records, scores)
    for w, r in zip(walked, records, strict=True):
        assert w.shape == (4, 32, 32)
        torch.testing.assert_close(w[0], torch.full((32, 32), 0.4))
        assert w[1 + r.label].sum() > 0
    assert AttentionWalkMasker().propagate([], []) == []


@pytest.mark.parametrize(
    ("beta", "logt", "walked_class"),
    [
        # (P + P^T) / 2 = [[1, .5], [.5, 1]]; columns normalised: [[2/3, 1/3], [1/3, 2/3]]
        (1.0, 0, [2 / 3, 1 / 3]),
        (1.0, 1, [5 / 9, 4 / 9]),  # two steps: the same matrix squared
        (2.0, 0, [0.8, 0.2]),  # squared affinities [[1, .25], [.25, 1]]
    ],
)
def test_attn_rw_walks_on_the_symmetrised_patch_attention(beta, logt, walked_class):
    attention = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # not symmetric: P alone walks elsewhere
    maps = torch.tensor([[[1.0, 0.0]]])  # one class on the left patch of a 1 x 2 grid
    rec = MapRecord(np.zeros((1, 2, 3), np.uint8), 0, maps, attention, (1, 2))
    scores = [torch.cat([torch.full((1, 1, 2), 0.4), maps])]
    (walked,) = AttentionWalkMasker(beta=beta, logt=logt).propagate([rec], scores)
    torch.testing.assert_close(walked, torch.tensor([[[0.4, 0.4]], [walked_class]]))


def test_symmetric_affinity_is_symmetric():
    p = torch.tensor([[[0.9, 0.1], [0.3, 0.7]]])
    torch.testing.assert_close(symmetric_affinity(p), torch.tensor([[[0.9, 0.2], [0.2, 0.7]]]))


def tiny_psa_config() -> dict:
    return {
        "method": "psa",
        "input_size": 32,
        "radius": 5,
        "alpha_low": 4,
        "alpha_high": 32,
        "beta": 8,
        "logt": 3,
        "background": {"kind": "power", "alpha": 16},
        "network": {"backbone": "resnet18", "weights_file": None},
        "train": {
            "epochs": 1,
            "batch_size": 2,
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "color_jitter": [0.3, 0.3, 0.3, 0.1],
        },
    }


def test_psa_fits_and_walks_on_tiny_images():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    records = [record(rng, i % 3) for i in range(4)]
    masker = create_masker(tiny_psa_config())
    assert isinstance(masker, PSAMasker)
    torch.manual_seed(0)
    before = list(AffinityNet("resnet18").parameters())  # where fit(seed=0) starts
    masker.fit(records, device=torch.device("cpu"), seed=0)
    assert any(
        not torch.equal(a, b) for a, b in zip(before, masker.network.parameters(), strict=True)
    )
    scores = [stack_background(r.maps, Background("power", alpha=16)) for r in records]
    walked = masker.propagate(records, scores)
    transitions = masker.transitions(records)
    assert transitions.shape == (4, 16, 16)
    torch.testing.assert_close(transitions.sum(1), torch.ones(4, 16))
    for score, transition, w in zip(scores, transitions, walked, strict=True):
        torch.testing.assert_close(w, walk_on_grid(score, transition, (4, 4), (32, 32)))
        assert not torch.allclose(w, score, atol=1e-3)


def test_psa_masks_depend_on_the_seed_not_on_earlier_random_draws():
    rng = np.random.default_rng(0)
    records = [record(rng, i % 3) for i in range(4)]
    scores = [stack_background(r.maps, Background("power", alpha=16)) for r in records]

    def walked(draws_before: int) -> list[torch.Tensor]:
        torch.manual_seed(0)
        torch.rand(draws_before)  # the job's earlier work: the fine-tune, other candidates
        masker = create_masker(tiny_psa_config())
        masker.fit(records, device=torch.device("cpu"), seed=0)
        return masker.propagate(records, scores)

    for a, b in zip(walked(0), walked(1), strict=True):
        torch.testing.assert_close(a, b)


def test_psa_rejects_an_input_size_off_the_stride():
    with pytest.raises(ValueError, match="multiple of 8"):
        PSAMasker({**tiny_psa_config(), "input_size": 30})


def test_registry_and_unknown_method():
    assert set(METHODS) == {"threshold", "attn_rw", "psa", "stain_grow"}
    assert isinstance(
        create_masker({"method": "attn_rw", "beta": 4, "logt": 1}), AttentionWalkMasker
    )
    with pytest.raises(ValueError, match="crf"):
        create_masker({"method": "crf"})


def test_a_background_the_method_cannot_take_is_refused_when_it_is_built():
    power = {"kind": "power", "alpha": 16}
    walk = {"method": "attn_rw", "beta": 4, "logt": 1}
    assert isinstance(create_masker({**walk, "background": power}), AttentionWalkMasker)
    with pytest.raises(ValueError, match="background.kind='power'.*stain_grow.*'constant'"):
        create_masker({"method": "stain_grow", "background": power})
    with pytest.raises(ValueError, match="powr"):
        create_masker({**walk, "background": {"kind": "powr"}})


def test_a_power_background_needs_a_positive_exponent():
    assert Background.from_config({"kind": "power", "alpha": 4}).alpha == 4
    for alpha in (0, -1, float("nan"), "16", True):
        with pytest.raises(ValueError, match="background.alpha must be a number > 0"):
            Background.from_config({"kind": "power", "alpha": alpha})


def _smear(size: int = 64, shift: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pale background, a white cell (dark nucleus in a lilac ring) and a red cell."""
    ys, xs = np.mgrid[0:size, 0:size]
    image = np.full((size, size, 3), (240, 225, 180), dtype=np.uint8)
    nucleus = (ys - 32) ** 2 + (xs - 44 - shift) ** 2 <= 9**2
    red_cell = (ys - 32) ** 2 + (xs - 12 - shift) ** 2 <= 9**2
    image[(ys - 32) ** 2 + (xs - 44 - shift) ** 2 <= 14**2] = (200, 170, 210)
    image[nucleus] = (70, 30, 110)
    image[red_cell] = (210, 90, 100)
    return image, nucleus, red_cell


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_stain_grow_finds_the_nucleus_the_maps_point_at():
    image, nucleus, red_cell = _smear()
    maps = torch.zeros(3, 64, 64)
    maps[1] = torch.as_tensor(nucleus.astype(np.float32))
    masker = create_masker({"method": "stain_grow", "background_seeds": "maps", "pick": "maps"})
    record = MapRecord(image, 1, maps, torch.zeros(1, 1), (1, 1))
    found = masker.nucleus(record).numpy()
    assert _iou(found, nucleus) > 0.7 and not (found & red_cell).any()
    (scores,) = masker.propagate([record], [maps])
    assert scores[0].abs().max() == 0 and scores[2].abs().max() == 0  # absent classes stay 0
    assert scores[1][32, 44] == 1  # on the nucleus
    assert 0 < scores[1][32, 56] < 1 and scores[1][32, 62] < scores[1][32, 56]  # falls off


def test_stain_grow_centre_prior_picks_the_central_blob_without_maps():
    image, nucleus, red_cell = _smear(shift=-12)  # white cell at the centre
    masker = StainGrowMasker(background_seeds="border", pick="centre")
    record = MapRecord(image, 0, torch.zeros(3, 64, 64), torch.zeros(1, 1), (1, 1))
    found = masker.nucleus(record).numpy()
    assert (found & nucleus).sum() > 0.8 * nucleus.sum() and not (found & red_cell).any()


def test_stain_grow_falls_back_to_the_centre_only_where_the_maps_are_empty():
    ys, xs = np.mgrid[0:64, 0:64]
    image = np.full((64, 64, 3), (240, 225, 180), dtype=np.uint8)
    central = (ys - 32) ** 2 + (xs - 32) ** 2 <= 7**2
    aside = (ys - 32) ** 2 + (xs - 52) ** 2 <= 5**2
    image[central | aside] = (70, 30, 110)
    masker = StainGrowMasker(background_seeds="border", pick="maps_else_centre")
    pointing_aside = torch.zeros(3, 64, 64)
    pointing_aside[0] = torch.as_tensor(aside.astype(np.float32))
    follows = masker.nucleus(MapRecord(image, 0, pointing_aside, torch.zeros(1), (1, 1))).numpy()
    assert _iou(follows, aside) > 0.7
    empty = MapRecord(image, 0, torch.zeros(3, 64, 64), torch.zeros(1), (1, 1))
    assert _iou(masker.nucleus(empty).numpy(), central) > 0.7
    (scores,) = masker.propagate([empty], [empty.maps])  # the weak label says which class grows
    assert scores[0][32, 32] == 1 and scores[1:].abs().max() == 0
    # Without the centre to fall back on, maps that point at no blob choose none.
    in_a_corner = torch.zeros(3, 64, 64)
    in_a_corner[0, :4, :4] = 1.0  # background only
    beside = MapRecord(image, 0, in_a_corner, torch.zeros(1), (1, 1))
    assert _iou(masker.nucleus(beside).numpy(), central) > 0.7
    for grow in ("radius", "region"):
        maps_only = StainGrowMasker(background_seeds="border", pick="maps", grow=grow)
        for record in (empty, beside):
            assert not maps_only.nucleus(record).any()
            (scores,) = maps_only.propagate([record], [record.maps])
            assert scores.abs().max() == 0


def _two_blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two nuclei on a pale background: one at the centre, a smaller one aside."""
    ys, xs = np.mgrid[0:64, 0:64]
    image = np.full((64, 64, 3), (240, 225, 180), dtype=np.uint8)
    central = (ys - 32) ** 2 + (xs - 32) ** 2 <= 7**2
    aside = (ys - 32) ** 2 + (xs - 52) ** 2 <= 5**2
    image[central | aside] = (70, 30, 110)
    return image, central, aside


def test_stain_grow_centre_pick_ignores_the_maps_and_maps_pick_ignores_the_background():
    image, central, aside = _two_blobs()
    pointing_aside = torch.zeros(3, 64, 64)
    pointing_aside[0] = torch.as_tensor(aside.astype(np.float32))
    record = MapRecord(image, 0, pointing_aside, torch.zeros(1), (1, 1))
    centre = StainGrowMasker(background_seeds="border", pick="centre").nucleus(record)
    assert _iou(centre.numpy(), central) > 0.7
    # Diffuse maps (a weak classifier's) give the large background the most mass: not a blob.
    diffuse = pointing_aside.clone()
    diffuse[0] = diffuse[0].clamp(min=0.2)
    record = MapRecord(image, 0, diffuse, torch.zeros(1), (1, 1))
    found = StainGrowMasker(background_seeds="border", pick="maps").nucleus(record)
    assert _iou(found.numpy(), aside) > 0.7


def test_stain_grow_options_tried_on_one_record_do_not_share_their_colour_distance():
    # pseudo.tune tries options on the same validation records, one after another.
    image, _, aside = _two_blobs()
    maps = torch.zeros(3, 64, 64)
    maps[0] = torch.as_tensor(aside.astype(np.float32))
    shared = MapRecord(image, 0, maps, torch.zeros(1), (1, 1))
    StainGrowMasker(background_seeds="border").nucleus(shared)
    for options in (
        {"background_seeds": "maps"},
        {"background_seeds": "maps", "colour_space": "lab"},
    ):
        masker = StainGrowMasker(**options)
        fresh = MapRecord(image, 0, maps, torch.zeros(1), (1, 1))
        torch.testing.assert_close(
            masker._background_distance(shared), masker._background_distance(fresh)
        )


@pytest.mark.parametrize("grey", [128, 200, 230])
def test_stain_grow_finds_no_cell_in_an_image_of_one_colour(grey):
    # A blank or over-exposed crop: rounding left its colour distances 1e-4 apart, and Otsu
    # split them into a blob that grew over the whole image (at grey 200, not 128).
    image = np.full((120, 120, 3), grey, dtype=np.uint8)
    record = MapRecord(image, 0, torch.ones(3, 120, 120), torch.zeros(1), (1, 1))
    for masker in (
        StainGrowMasker(background_seeds="border", pick="maps_else_centre"),
        StainGrowMasker(background_seeds="maps", pick="maps", colour_space="lab"),
    ):
        assert not masker.cell(record).any()
        (scores,) = masker.propagate([record], [record.maps])
        assert scores.abs().max() == 0


def test_stain_grow_region_reaches_the_cytoplasm_but_not_a_bridged_red_cell():
    image, nucleus, red_cell = _smear()
    ys, xs = np.mgrid[0:64, 0:64]
    cell = (ys - 32) ** 2 + (xs - 44) ** 2 <= 14**2
    image[30:34, 20:31] = (210, 90, 100)  # a 4-pixel bridge from the red cell to the white one
    maps = torch.zeros(3, 64, 64)
    maps[1] = torch.as_tensor(nucleus.astype(np.float32))
    record = MapRecord(image, 1, maps, torch.zeros(1, 1), (1, 1))
    masker = StainGrowMasker(background_seeds="border", grow="region", opening=0.08)
    found = masker.cell(record).numpy()
    assert _iou(found, cell) > 0.8 and not (found & red_cell).any()
    unopened = StainGrowMasker(background_seeds="border", grow="region", opening=0)
    assert (unopened.cell(record).numpy() & red_cell).any()  # the opening is what cut the bridge
    (scores,) = masker.propagate([record], [maps])
    assert scores[1][32, 32] == 1  # the cytoplasm counts as cell at any background constant


def test_stain_grow_rejects_unknown_options():
    with pytest.raises(ValueError, match="pick"):
        StainGrowMasker(pick="largest")
    with pytest.raises(ValueError, match="grow"):
        StainGrowMasker(grow="flood")
    with pytest.raises(ValueError, match="cell_fraction"):
        StainGrowMasker(cell_fraction=1.5)


def test_rgb_to_lab_reference_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    expected = torch.tensor([[100.0, 0.0, 0.0], [53.24, 80.09, 67.20], [0.0, 0.0, 0.0]]) / 100
    torch.testing.assert_close(rgb_to_lab(rgb), expected, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="colour_space"):
        StainGrowMasker(colour_space="hsv")
