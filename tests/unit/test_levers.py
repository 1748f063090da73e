"""The foreground levers: each loss rewards the mask that covers the cell, and only that."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.config import compose_config
from common.levers import (
    LEVER_WEIGHTS,
    area_loss,
    compactness_loss,
    contrast_loss,
    foreground_loss,
    paste_cells,
    size_loss,
    suppression_loss,
)
from common.localization import fused_maps, oriented_foreground
from common.model import create_mct_model
from common.training import mct_objective

CELL = (slice(None), slice(None), slice(1, 3), slice(1, 3))  # a 2x2 cell on a 4x4 grid


def _scene() -> tuple[nn.Conv2d, torch.Tensor, torch.Tensor]:
    """A head scoring class 0 from feature 0, features with that evidence on the cell only."""
    head = nn.Conv2d(2, 2, kernel_size=1)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[0, 0] = 8.0
        head.bias.fill_(-1.0)
    features = torch.zeros(1, 2, 4, 4)
    features[:, 0][CELL[1:]] = 1.0
    cell = torch.zeros(1, 1, 4, 4)
    cell[CELL] = 1.0
    return head, features, cell


def test_suppression_prefers_the_cell_mask_to_its_inverse_and_to_nothing():
    head, features, cell = _scene()
    targets = torch.tensor([[1.0, 0.0]])
    on_cell = suppression_loss(head, features, cell, targets)
    assert on_cell < suppression_loss(head, features, 1.0 - cell, targets)
    assert on_cell < suppression_loss(head, features, torch.zeros_like(cell), targets)


def test_suppression_grows_the_mask_over_evidence_and_area_shrinks_it_elsewhere():
    head, features, _ = _scene()
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    suppression_loss(head, features, torch.sigmoid(logits), torch.tensor([[1.0, 0.0]])).backward()
    grad = logits.grad[0, 0]
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 1:3] = True
    assert (grad[inside] < 0).all()  # gradient descent raises M where the evidence is
    assert torch.count_nonzero(grad[~inside]) == 0  # and has no say where there is none

    logits.grad = None
    area_loss(torch.sigmoid(logits)).backward()
    assert (logits.grad > 0).all()  # the area term lowers M everywhere


def test_a_cell_free_crop_cannot_hide_evidence_behind_its_mask():
    head, features, cell = _scene()
    none = torch.zeros(1, 2)
    hidden = suppression_loss(head, features, cell, none).item()
    shown = suppression_loss(head, features, torch.zeros_like(cell), none).item()
    assert hidden == pytest.approx(shown)
    assert hidden > suppression_loss(head, torch.zeros_like(features), cell, none).item()


def _pair(cell_vec: torch.Tensor, back_vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = back_vec[None, :, None, None].repeat(2, 1, 4, 4)
    features[:, :, 1:3, 1:3] = cell_vec[:, None, None]
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, 1:3, 1:3] = 1.0
    return features, masks


def test_contrast_is_near_zero_for_perfect_masks_and_high_for_an_inverted_one():
    features, masks = _pair(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]))
    assert contrast_loss(features, masks) < 0.01
    flipped = masks.clone()
    flipped[1] = 1.0 - flipped[1]
    assert contrast_loss(features, flipped) > 1.0


def test_contrast_of_alike_sides_stays_finite_under_half_precision_autocast():
    # What CUDA's float16 autocast does to the matmul, on the CPU: with the products in float16
    # the clamp's 1 - 1e-4 became 1 and the loss inf at the first step of many seeds.
    features, masks = _pair(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.001]))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = contrast_loss(features, masks)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(contrast_loss(features, masks).item())


def test_contrast_gradient_moves_the_mask_towards_the_cell():
    features, masks = _pair(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    logits = torch.zeros(2, 1, 4, 4)
    logits[0] = torch.where(masks[0] > 0, 4.0, -4.0)  # image 0 knows its cell
    logits.requires_grad_(True)
    contrast_loss(features, torch.sigmoid(logits)).backward()
    grad = logits.grad[1, 0]  # image 1 starts undecided
    assert grad[1:3, 1:3].mean() < 0 < grad[0].mean()


def test_size_costs_nothing_inside_the_bounds_and_grows_a_small_cell_side():
    nucleus = torch.zeros(2, 1, 10, 10)
    nucleus[:, :, 4:6, 4:6] = 1.0  # 4 % of the image
    cell = torch.zeros(2, 1, 10, 10)
    cell[:, :, 3:8, 3:8] = 1.0  # 25 %
    assert size_loss(cell, (0.15, 0.5)) == 0.0
    # Whichever sign the head gave the split: its smaller side is what the constraint measures.
    assert size_loss(1.0 - cell, (0.15, 0.5)) == 0.0
    assert torch.isclose(size_loss(nucleus, (0.15, 0.5)), torch.tensor(0.11**2))
    mask = torch.full((2, 1, 10, 10), 0.05, requires_grad=True)
    size_loss(mask, (0.15, 0.5)).backward()
    assert (mask.grad < 0).all()  # gradient descent raises the cell side everywhere
    with pytest.raises(ValueError, match="size_bounds"):
        size_loss(cell, (0.5, 0.15))


def _disk(centre: tuple[float, float], radius: float, size: int = 24) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) <= radius**2).float()


def test_compactness_is_near_zero_for_a_disk_anywhere_and_grows_with_a_detached_blob():
    centred, corner = _disk((12, 12), 5), _disk((6, 6), 5)
    assert 0.0 <= compactness_loss(centred[None, None]) < 0.05
    assert torch.isclose(
        compactness_loss(corner[None, None]), compactness_loss(centred[None, None])
    )
    # The cell grown by an adjacent rim stays a disk; the same area taken from a red cell
    # elsewhere in the crop is not.
    grown = _disk((12, 12), 6)[None, None]
    elsewhere = (centred + _disk((4, 20), 3.3)).clamp(max=1.0)[None, None]
    assert abs(float(grown.sum() - elsewhere.sum())) < 6
    assert compactness_loss(elsewhere) > compactness_loss(grown) + 0.5
    # So a nucleus that must grow pays far less for its rim than for a distant patch.
    nucleus = centred[None, None].clone().requires_grad_(True)
    compactness_loss(nucleus).backward()
    rim, distant = nucleus.grad[0, 0, 12, 18], nucleus.grad[0, 0, 3, 21]
    assert distant > 0 and distant > 5 * rim


def test_foreground_maps_take_the_smaller_side_as_the_cell_for_the_whole_batch():
    cells = torch.zeros(3, 1, 4, 4)
    cells[:, :, 1:3, 1:3] = 1.0
    cells[2, :, 0:3, 0:4] = 1.0  # one large cell, over half of its image
    assert torch.equal(oriented_foreground(cells), cells)
    # A head that marks the background is flipped, the large cell included.
    assert torch.equal(oriented_foreground(1.0 - cells), cells)


def test_the_default_trains_the_foreground_head_by_contrast_and_the_paper_does_not():
    targets = torch.eye(5)[:2]
    cfg = compose_config([])
    model = create_mct_model(cfg.model, num_classes=5)
    output = model(torch.randn(2, 3, 96, 96))
    assert cfg.localization.source == "foreground" and not cfg.localization.refine
    assert float(cfg.train.levers.foreground.contrast) > 0
    assert foreground_loss(output, targets, model.head, cfg.train.levers.foreground) is not None
    off = dict.fromkeys(LEVER_WEIGHTS, 0.0)
    assert foreground_loss(output, targets, model.head, off) is None

    paper = compose_config(["experiment=paper"])
    assert not paper.model.foreground_head
    assert float(paper.train.levers.foreground.contrast) == 0.0
    assert paper.localization.source == "fused" and paper.localization.refine


def test_the_shape_levers_leave_cell_free_crops_out():
    cells = torch.zeros(3, 1, 12, 12)
    cells[:, :, 4:8, 4:8] = 1.0
    cell_logits = 8.0 * (2.0 * cells - 1.0)
    faint = torch.full((1, 1, 12, 12), -4.6)  # a cell-free crop's head at p = 0.01, as it should
    weights = {**dict.fromkeys(LEVER_WEIGHTS, 0.0), "size": 1.0, "compact": 1.0}
    weights["size_bounds"] = [0.15, 0.5]
    targets = torch.cat([torch.eye(5)[:3], torch.zeros(1, 5)])

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        output = SimpleNamespace(
            foreground=logits, patch_features=torch.zeros(len(logits), 4, 12, 12)
        )
        return foreground_loss(output, targets, nn.Identity(), weights)

    # Alone, the faint crop's compactness is about 1/p = 100: it would outweigh the cells.
    with_crop = loss(torch.cat([cell_logits, faint]), targets)
    assert torch.isclose(with_crop, loss(cell_logits, targets[:3]))
    assert loss(faint, targets[3:]) == 0.0


def test_foreground_levers_need_the_head():
    cfg = compose_config(["model.foreground_head=false"])
    model = create_mct_model(cfg.model, num_classes=5)
    output = model(torch.randn(2, 3, 96, 96))
    on = {**dict.fromkeys(LEVER_WEIGHTS, 0.0), "suppression": 1.0, "area": 0.5}
    with pytest.raises(ValueError, match="foreground_head"):
        foreground_loss(output, torch.eye(5)[:2], model.head, on)


def test_the_foreground_head_trains_and_gives_class_agnostic_maps():
    cfg = compose_config([])
    model = create_mct_model(cfg.model, num_classes=5)
    output = model(torch.randn(2, 3, 96, 96), return_attention=True)
    assert output.foreground.shape == (2, 1, 12, 12)
    weights: dict = dict.fromkeys(LEVER_WEIGHTS, 1.0)
    weights["size_bounds"] = [0.15, 0.5]
    foreground_loss(output, torch.eye(5)[:2], model.head, weights).backward()
    assert model.fg_head.weight.grad.abs().sum() > 0
    maps = fused_maps(output, 3, source="foreground")
    assert maps.shape == (2, 5, 12, 12)
    assert torch.allclose(maps[:, :1], oriented_foreground(torch.sigmoid(output.foreground)))
    assert torch.allclose(maps[:, 0], maps[:, 4])
    fused = fused_maps(output, 3) * maps
    assert torch.allclose(fused_maps(output, 3, source="fused_foreground"), fused)


def _two_cells() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 8x8 images (patch grid 4x4 of 2 px): image 0 red with a white cell top left, image 1
    blue with a green cell bottom right; the cell sides mark one patch of each cell."""
    images = torch.zeros(2, 3, 8, 8)
    images[0, 0] = 1.0
    images[0, :, 0:2, 0:2] = 1.0
    images[1, 2] = 1.0
    images[1, :, 6:8, 6:8] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    cell = torch.zeros(2, 1, 4, 4)
    cell[0, 0, 0, 0] = 0.9
    cell[1, 0, 3, 3] = 0.9
    return images, torch.eye(3)[:2], cell


def test_a_pasted_cell_replaces_the_receivers_own_and_brings_its_label():
    images, targets, cell = _two_cells()
    torch.manual_seed(0)
    pasted, labels = paste_cells(images, targets, cell, share=0.5)
    receiver = int(torch.nonzero((pasted != images).flatten(1).any(dim=1))[0, 0])
    donor = 1 - receiver
    assert torch.equal(labels[receiver], targets[donor])
    assert torch.equal(labels[donor], targets[donor]) and torch.equal(pasted[donor], images[donor])
    # The donor's cell side grown by one patch (4x4 px at its corner) now lies on the receiver.
    donor_region = (slice(0, 4), slice(0, 4)) if donor == 0 else (slice(4, 8), slice(4, 8))
    assert torch.equal(
        pasted[receiver][:, donor_region[0], donor_region[1]],
        images[donor][:, donor_region[0], donor_region[1]],
    )
    # The receiver's own cell is gone: painted in its background colour (plain red or blue).
    background = images[receiver][:, 3, 4] if receiver == 0 else images[receiver][:, 0, 4]
    own = (slice(0, 2), slice(0, 2)) if receiver == 0 else (slice(6, 8), slice(6, 8))
    assert torch.allclose(pasted[receiver][:, own[0], own[1]], background[:, None, None])
    assert not torch.equal(images, pasted) and images[0, 0, 0, 0] == 1.0  # inputs untouched


def test_no_share_or_no_cell_leaves_the_batch_as_it_was_and_a_bad_share_is_refused():
    images, targets, cell = _two_cells()
    assert paste_cells(images, targets, cell, share=0.0)[0] is images
    same, labels = paste_cells(images, targets, torch.zeros_like(cell), share=1.0)
    assert torch.equal(same, images) and torch.equal(labels, targets)
    with pytest.raises(ValueError, match="copy_paste=1.5"):
        paste_cells(images, targets, cell, share=1.5)


def test_copy_paste_trains_on_pasted_batches_and_needs_the_head():
    cfg = compose_config(["train.levers.copy_paste=1.0"])
    model = create_mct_model(cfg.model, num_classes=5)
    images, targets = torch.randn(4, 3, 96, 96), torch.eye(5)[:4]
    trained_on = []
    model.register_forward_pre_hook(
        lambda module, args: trained_on.append(args[0]) if module.training else None
    )
    torch.manual_seed(0)
    loss = mct_objective(cfg.train.levers)(model, images, targets)
    with torch.no_grad():
        cell = oriented_foreground(torch.sigmoid(model.eval()(images).foreground.float()))
    torch.manual_seed(0)  # the eval pass draws nothing: the paste's draws come first
    pasted, _ = paste_cells(images, targets, cell, 1.0)
    assert torch.isfinite(loss) and not torch.equal(pasted, images)
    assert len(trained_on) == 1 and torch.equal(trained_on[0], pasted)
    headless = create_mct_model(compose_config(["model.foreground_head=false"]).model, 5)
    with pytest.raises(ValueError, match="model.foreground_head=true"):
        mct_objective(cfg.train.levers)(headless, images, targets)


def test_copy_paste_reads_the_cells_in_eval_mode_and_trains_in_train_mode():
    cfg = compose_config(["train.levers.copy_paste=1.0"])
    model = create_mct_model(cfg.model, num_classes=5).train()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    mct_objective(cfg.train.levers)(model, torch.randn(2, 3, 96, 96), torch.eye(5)[:2])
    assert modes == [False, True] and model.training
