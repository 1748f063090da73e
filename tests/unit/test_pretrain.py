"""Federated pretraining: the instance and masked-image objectives, and one hospital's round."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from common.augment import train_cache_size
from common.config import compose_config
from common.data import split_tensors
from common.model import create_mct_model
from common.pretrain import block_mask, cutmix, instance_loss, masked_objective, pretrain_round


def test_instance_loss_is_cross_entropy_and_smoothing_raises_its_floor():
    logits = torch.randn(4, 6)
    targets = F.one_hot(torch.tensor([0, 3, 5, 1]), 6).float()
    plain = instance_loss(logits, targets, 0.0)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, targets.argmax(1)).item())
    confident = 50 * targets
    assert instance_loss(confident, targets, 0.0) < 1e-6
    assert instance_loss(confident, targets, 0.1) > 1.0  # smoothing forbids certainty


def test_instance_loss_gradient_raises_the_own_instance_logit():
    logits = torch.zeros(2, 5, requires_grad=True)
    targets = F.one_hot(torch.tensor([1, 4]), 5).float()
    instance_loss(logits, targets, 0.1).backward()
    assert logits.grad[0, 1] < 0 and logits.grad[1, 4] < 0  # descent raises them
    assert (logits.grad[0, [0, 2, 3, 4]] > 0).all()


def test_cutmix_mixes_targets_by_the_pixels_each_image_keeps():
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    targets = torch.eye(2)
    for seed in range(5):
        mixed, soft = cutmix(images, targets, torch.Generator().manual_seed(seed))
        from_partner = mixed[0, 0].mean().item()  # image 0 is zeros; partner pixels are ones
        assert soft[0, 1].item() == pytest.approx(from_partner)
        assert torch.allclose(soft.sum(1), torch.ones(2))


class RecordingBackbone:
    """Stands in for the model: records what it was shown, returns zero patch features."""

    def __init__(self, dim: int, patch: int) -> None:
        self.dim, self.patch, self.seen = dim, patch, None

    def __call__(self, images: torch.Tensor) -> SimpleNamespace:
        self.seen = images.clone()
        b, _, h, w = images.shape
        grid = (h // self.patch, w // self.patch)
        return SimpleNamespace(patch_features=torch.zeros(b, self.dim, *grid))


def test_block_mask_hides_whole_blocks_at_about_the_ratio():
    hidden = block_mask(torch.zeros(64, 3, 96, 96), 16, 0.6, torch.Generator().manual_seed(0))
    assert hidden.shape == (64, 1, 96, 96)
    blocks = hidden.unfold(2, 16, 16).unfold(3, 16, 16)
    assert torch.equal(blocks.amin(dim=(-2, -1)), blocks.amax(dim=(-2, -1)))  # all or nothing
    assert 0.55 < hidden.mean().item() < 0.65
    uneven = block_mask(torch.zeros(2, 3, 40, 40), 16, 0.5, torch.Generator().manual_seed(0))
    assert uneven.shape == (2, 1, 40, 40)


def test_masked_objective_hides_blocks_from_the_model_and_scores_only_them():
    images = torch.rand(4, 3, 32, 32)
    decoder = torch.nn.Conv2d(8, 3 * 4 * 4, kernel_size=1)
    torch.nn.init.zeros_(decoder.weight)
    torch.nn.init.zeros_(decoder.bias)  # redraws every pixel as 0
    cfg = {"mask_ratio": 0.5, "mask_block": 2}
    backbone = RecordingBackbone(dim=8, patch=4)
    loss = masked_objective(decoder, cfg, 4, torch.Generator().manual_seed(3))(
        backbone, images, torch.zeros(4)
    )
    hidden = block_mask(images, 8, 0.5, torch.Generator().manual_seed(3))
    assert 0 < hidden.mean() < 1
    fill = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    shown = backbone.seen
    assert torch.equal(shown * (1 - hidden), images * (1 - hidden))
    assert torch.allclose((shown * hidden), fill * hidden)
    expected = (images * hidden).sum() / (3 * hidden.sum())
    assert loss.item() == pytest.approx(expected.item())  # visible pixels cost nothing


@pytest.mark.parametrize("method", ["instance", "masked"])
def test_a_pretraining_round_trains_the_backbone_and_keeps_its_head_local(method):
    cfg = compose_config(
        [f"pretrain={method}", "data.hospitals.hospital_a.num_images=24", "pretrain.local_epochs=1"]
    )
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    data = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size))
    n, dim = len(data.labels), model.embed_dim
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"server_round": 1, "hospital_index": 0, "device": torch.device("cpu")}
    # A head kept from a round of the other method (or another image count) starts afresh.
    other = (
        {"weight": torch.zeros(n, dim), "bias": torch.zeros(n)}
        if method == "masked"
        else {"weight": torch.zeros(3 * model.patch_size**2, dim, 1, 1)}
    )
    result, head = pretrain_round(model, data, cfg, other, **kwargs)
    expected = (n, dim) if method == "instance" else (3 * model.patch_size**2, dim, 1, 1)
    assert head["weight"].shape == expected
    assert result.num_examples == n and result.loss > 0
    after = model.state_dict()
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert torch.equal(before["head.weight"], after["head.weight"])  # no gradient reaches it
    _, again = pretrain_round(model, data, cfg, head, **{**kwargs, "server_round": 2})
    assert not torch.equal(again["weight"], head["weight"])  # the kept head trains on


@pytest.mark.parametrize("method", ["instance", "masked"])
def test_a_new_head_does_not_depend_on_what_the_process_drew_before(method):
    # A ClientApp process runs other hospitals' rounds (or none, when a run resumes) first.
    cfg = compose_config(
        [f"pretrain={method}", "data.hospitals.hospital_a.num_images=24", "pretrain.local_epochs=1"]
    )
    data = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size))
    heads = []
    for history in (1, 2):
        torch.manual_seed(0)
        model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
        torch.manual_seed(history)
        _, head = pretrain_round(
            model, data, cfg, None, server_round=1, hospital_index=0, device=torch.device("cpu")
        )
        heads.append(head)
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
