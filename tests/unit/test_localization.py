from dataclasses import replace

import numpy as np
import pytest
import timm
import torch

from common.augment import normalise
from common.imaging import resize_images
from common.localization import (
    MapSettings,
    batch_maps,
    fused_maps,
    generate_maps,
    larger_side_is_cell,
    load_maps,
    maps_orientation,
    normalise_maps,
    patch_affinity,
    refine_maps,
    save_maps,
)
from common.model import MCTOutput

# Golden case: C = 2 classes, a 1 x 2 patch grid (N = 2, T = 4), three layers with
# attention_l = l * BASE, so sums over layers are multiples of BASE.
BASE = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
PATCH_CAM = torch.tensor([[[[-1.0, 2.0]], [[0.5, -0.5]]]])  # (1, C, 1, 2), before ReLU


def golden_output() -> MCTOutput:
    attentions = [(layer * BASE)[None] for layer in (1, 2, 3)]
    return MCTOutput(torch.zeros(1, 2), torch.zeros(1, 2), PATCH_CAM, attentions)


def test_fusion_sums_last_k_class_attention_times_relu_cam():
    # last 2 layers: (2 + 3) * BASE[:2, 2:] = 5 * [[.2, .3], [.6, .7]] = [[1, 1.5], [3, 3.5]]
    # ReLU(cam) = [[0, 2], [.5, 0]]  ->  product [[0, 3], [1.5, 0]]
    maps = fused_maps(golden_output(), last_k_layers=2)
    torch.testing.assert_close(maps, torch.tensor([[[[0.0, 3.0]], [[1.5, 0.0]]]]))


def test_fusion_mean_over_layers_is_sum_over_k():
    maps = fused_maps(golden_output(), last_k_layers=2, reduce="mean")
    torch.testing.assert_close(maps, torch.tensor([[[[0.0, 1.5]], [[0.75, 0.0]]]]))


def test_fusion_minmax_factors_normalises_each_factor_first():
    # class attention per class -> [0, 1] and [0, 1]; ReLU(cam) -> [0, 1] and [1, 0]
    maps = fused_maps(golden_output(), last_k_layers=2, minmax_factors=True)
    torch.testing.assert_close(maps, torch.tensor([[[[0.0, 1.0]], [[0.0, 0.0]]]]))


def test_single_factor_sources():
    output = golden_output()
    torch.testing.assert_close(
        fused_maps(output, 2, source="class_attention"),
        torch.tensor([[[[1.0, 1.5]], [[3.0, 3.5]]]]),
    )
    torch.testing.assert_close(
        fused_maps(output, 2, source="patch_cam"), torch.tensor([[[[0.0, 2.0]], [[0.5, 0.0]]]])
    )
    with pytest.raises(ValueError, match="source"):
        fused_maps(output, 2, source="both")
    with pytest.raises(ValueError, match="last_k_layers"):
        fused_maps(output, 4)


def test_refinement_is_one_product_with_the_all_layer_patch_attention():
    # P = (1 + 2 + 3) * BASE[2:, 2:] = [[6.0, 6.6], [8.4, 9.0]]
    # refined[c, p] = sum_q P[p, q] cam[c, q] with cam = [[0, 3], [1.5, 0]]
    output = golden_output()
    affinity = patch_affinity(output.attentions, num_classes=2)
    torch.testing.assert_close(affinity, torch.tensor([[[6.0, 6.6], [8.4, 9.0]]]))
    refined = refine_maps(fused_maps(output, 2), affinity)
    torch.testing.assert_close(refined, torch.tensor([[[[19.8, 27.0]], [[9.0, 12.6]]]]))
    with pytest.raises(ValueError, match="does not fit"):
        refine_maps(fused_maps(output, 2), torch.ones(1, 3, 3))


def test_normalise_maps_zeroes_absent_and_minmaxes_present():
    maps = torch.tensor([[[[0.0, 3.0]], [[1.5, 0.0]]]])
    out = normalise_maps(maps, (2, 4), torch.tensor([[1.0, 0.0]]))
    assert out.shape == (1, 2, 2, 4)
    assert out[0, 1].abs().max() == 0
    assert out[0, 0].min() == 0 and out[0, 0].max() == pytest.approx(1.0)
    # Over the whole map, not per row: a row of weak values stays weak.
    square = normalise_maps(torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]]), (2, 2), torch.ones(1, 1))
    torch.testing.assert_close(square[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("mct_tiny_patch8_96", num_classes=3, img_size=32).eval()


def test_batch_maps_native_sizes_labels_and_range(tiny_model):
    images = torch.randn(3, 3, 32, 32)
    present = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    sizes = [(40, 40), (24, 30), (40, 40)]
    batch = batch_maps(tiny_model, images, present, sizes, MapSettings(last_k_layers=2))
    assert batch.grid == (4, 4) and batch.affinity.shape == (3, 16, 16)
    for maps, size, labels in zip(batch.maps, sizes, present, strict=True):
        assert maps.shape == (3, *size)
        assert maps[labels == 0].abs().max() == 0
        assert maps[labels == 1].max() == pytest.approx(1.0, abs=1e-3) and maps.min() >= 0


def test_flip_pass_makes_maps_flip_equivariant(tiny_model):
    image = torch.randn(1, 3, 32, 32)
    present = torch.tensor([[0.0, 1.0, 0.0]])
    settings = MapSettings(last_k_layers=2, scales=(1.0, 0.75), hflip=True)
    plain = batch_maps(tiny_model, image, present, [(32, 32)], settings).maps[0]
    flipped = batch_maps(tiny_model, image.flip(-1), present, [(32, 32)], settings).maps[0]
    torch.testing.assert_close(flipped, plain.flip(-1), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("dims", [(-1,), (-2,), (-2, -1)])
def test_four_flip_passes_make_maps_equivariant_to_both_flips(tiny_model, dims):
    image = torch.randn(1, 3, 32, 32)
    present = torch.tensor([[0.0, 1.0, 0.0]])
    both = MapSettings(last_k_layers=2, scales=(1.0, 0.75), hflip=True, vflip=True)
    assert both.flips() == [(), (-1,), (-2,), (-1, -2)]
    plain = batch_maps(tiny_model, image, present, [(32, 32)], both).maps[0]
    flipped = batch_maps(tiny_model, image.flip(dims), present, [(32, 32)], both).maps[0]
    torch.testing.assert_close(flipped, plain.flip(dims), atol=2e-4, rtol=1e-3)
    if -2 in dims:  # the horizontal pass alone does not see a cell upside down
        across = MapSettings(last_k_layers=2, scales=(1.0, 0.75), hflip=True)
        plain = batch_maps(tiny_model, image, present, [(32, 32)], across).maps[0]
        flipped = batch_maps(tiny_model, image.flip(dims), present, [(32, 32)], across).maps[0]
        assert not torch.allclose(flipped, plain.flip(dims), atol=2e-4, rtol=1e-3)


def test_the_affinity_is_the_unflipped_passs_and_the_scales_sum_in_any_order(tiny_model):
    images = torch.randn(2, 3, 32, 32)
    present = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])

    def batch(**settings: object):
        return batch_maps(tiny_model, images, present, [(32, 32)] * 2, MapSettings(**settings))

    # attn_rw walks the unflipped maps on this affinity: a mirrored one would misplace them.
    flipped, plain = batch(last_k_layers=2, hflip=True), batch(last_k_layers=2, hflip=False)
    torch.testing.assert_close(flipped.affinity, plain.affinity)
    both = batch(last_k_layers=2, scales=(1.0, 0.5)).maps[0]
    torch.testing.assert_close(both, batch(last_k_layers=2, scales=(0.5, 1.0)).maps[0])
    assert not torch.allclose(both, batch(last_k_layers=2, scales=(1.0,)).maps[0], atol=1e-3)


def test_generate_maps_does_not_depend_on_batching(tiny_model):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, h, 3), dtype=np.uint8) for h in (30, 44, 30, 52)]
    labels = [0, 2, 1, 2]
    settings = MapSettings(last_k_layers=2, input_size=32)
    one, affinity_one, grid = generate_maps(
        tiny_model, images, labels, settings, device=torch.device("cpu"), batch_size=1
    )
    four, affinity_four, _ = generate_maps(
        tiny_model, images, labels, settings, device=torch.device("cpu"), batch_size=4
    )
    assert grid == (4, 4)
    for a, b in zip(one + affinity_one, four + affinity_four, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


FOREGROUND_MAPS = MapSettings(last_k_layers=2, input_size=32, source="foreground", refine=False)


def model_with_head() -> torch.nn.Module:
    """A fresh tiny model with the foreground head (a test may change its weights)."""
    torch.manual_seed(0)
    return timm.create_model(
        "mct_tiny_patch8_96", num_classes=3, img_size=32, foreground_head=True
    ).eval()


def straddling_head(above: int) -> tuple[torch.nn.Module, list[np.ndarray], torch.Tensor]:
    """A head whose bias puts ``above`` of five random images' areas past one half.

    Returns the model, the images and the head's area on each.
    """
    model = model_with_head()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
    batch = normalise(resize_images(images, 32))
    with torch.no_grad():
        logits = (model(batch).foreground.flatten(1) - model.fg_head.bias).mean(1).sort().values
        model.fg_head.bias.fill_(-float(logits[4 - above : 6 - above].mean()))
        areas = torch.sigmoid(model(batch).foreground).mean(dim=(1, 2, 3))
    return model, images, areas


def test_an_images_foreground_map_does_not_depend_on_the_images_beside_it():
    """The head's sign is decided over the whole split, not per chunk of ``batch_size``."""
    model, images, areas = straddling_head(above=2)
    assert 0 < int((areas > 0.5).sum()) < 5

    def maps(batch_size: int) -> list[torch.Tensor]:
        cpu = torch.device("cpu")
        return generate_maps(
            model, images, [0] * 5, FOREGROUND_MAPS, device=cpu, batch_size=batch_size
        )[0]

    for alone, together in zip(maps(1), maps(5), strict=True):
        torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-4)


def test_an_orientation_decided_on_other_images_holds_for_a_split_that_would_decide_alone():
    """w3s-postprocess orients the validation and test maps by the training split's decision."""
    model, train, areas = straddling_head(above=1)
    lone = int(areas.argmax())
    cpu = torch.device("cpu")
    flip = maps_orientation(model, train, FOREGROUND_MAPS, device=cpu)
    assert flip is False
    assert maps_orientation(model, [train[lone]], FOREGROUND_MAPS, device=cpu) is True
    test_split = generate_maps(model, [train[lone]], [0], FOREGROUND_MAPS, device=cpu, flip=flip)
    with_train = generate_maps(model, train, [0] * 5, FOREGROUND_MAPS, device=cpu)
    torch.testing.assert_close(test_split[0][0], with_train[0][lone], atol=1e-5, rtol=1e-4)
    patch_cam = replace(FOREGROUND_MAPS, source="patch_cam")
    assert maps_orientation(model, train, patch_cam, device=cpu) is None


def test_the_split_wide_orientation_keeps_no_autograd_graph():
    # w3s-postprocess makes its maps outside no_grad: each batch's graph held until the
    # decision made memory grow with the split (2.1 GB for 512 small images, measured).
    model = model_with_head()
    graphs = []
    model.register_forward_hook(lambda module, args, output: graphs.append(torch.is_grad_enabled()))
    images = [np.zeros((32, 32, 3), dtype=np.uint8)] * 3
    cpu = torch.device("cpu")
    generate_maps(model, images, [0, 1, 2], FOREGROUND_MAPS, device=cpu, batch_size=2)
    assert graphs and not any(graphs)


def test_settings_from_config_and_validation(tiny_model):
    settings = MapSettings.from_config({"scales": [1, 0.75], "hflip": False, "input_size": 40})
    assert settings.scales == (1.0, 0.75)
    assert settings.side(tiny_model, 1.0) == 40 and settings.side(tiny_model, 0.75) == 32
    with pytest.raises(ValueError, match="scales"):
        MapSettings(scales=())


def test_maps_round_trip_through_npz_without_pickles(tmp_path):
    maps = torch.zeros(5, 6, 7)
    maps[3] = torch.rand(6, 7)
    path = tmp_path / "maps" / "x.npz"
    save_maps(path, maps)
    with np.load(path, allow_pickle=False) as data:
        assert data["classes"].tolist() == [3]
        assert data["maps"].shape == (1, 6, 7)
    torch.testing.assert_close(load_maps(path), maps)


@pytest.mark.parametrize("areas", [[0.42, 0.6], [0.2, 0.45, 0.6, 0.9], [0.3, 0.55, 0.7]])
def test_the_head_and_its_negation_never_both_call_their_own_side_the_cell(areas):
    # An even count's middle pair either side of 0.5 took the lower one for both.
    areas = torch.tensor(areas)
    assert larger_side_is_cell(areas) != larger_side_is_cell(1 - areas)
