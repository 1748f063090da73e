"""Instance-discrimination pretraining: its loss, CutMix, and one hospital's round."""

import pytest
import torch
import torch.nn.functional as F

from common.augment import train_cache_size
from common.config import compose_config
from common.data import split_tensors
from common.model import create_mct_model
from common.pretrain import cutmix, instance_loss, pretrain_round


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


def test_a_pretraining_round_trains_the_backbone_and_keeps_the_head_local():
    cfg = compose_config(
        ["pretrain=instance", "data.hospitals.hospital_a.num_images=24", "pretrain.local_epochs=1"]
    )
    model = create_mct_model(cfg.model, num_classes=len(cfg.data.classes))
    data = split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = {"server_round": 1, "hospital_index": 0, "device": torch.device("cpu")}
    result, head = pretrain_round(model, data, cfg, None, **kwargs)
    assert head["weight"].shape == (len(data.labels), model.embed_dim)
    assert result.num_examples == len(data.labels) and result.loss > 0
    after = model.state_dict()
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert torch.equal(before["head.weight"], after["head.weight"])  # no gradient reaches it
    _, again = pretrain_round(model, data, cfg, head, **{**kwargs, "server_round": 2})
    assert not torch.equal(again["weight"], head["weight"])  # the kept head trains on
