import argparse
import itertools
import logging
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from common.config import compose_config
from common.model import (
    MCTFormerV2,
    MCTOutput,
    create_mct_model,
    load_deit_weights,
    mct_loss,
)
from common.torch_files import CheckpointError
from server_app.launch import check_training_config

NUM_CLASSES = 5
TINY = dict(img_size=96, patch_size=8, embed_dim=96, depth=4, num_heads=3)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(**kwargs) -> MCTFormerV2:
    return timm.create_model("mct_tiny_patch8_96", num_classes=NUM_CLASSES, **kwargs)


def multi_hot(batch: int) -> torch.Tensor:
    targets = (torch.rand(batch, NUM_CLASSES) > 0.5).float()
    targets[:, 0] = 1.0  # every image has at least one class
    return targets


def check_output(out: MCTOutput, batch: int, grid: tuple[int, int], depth: int) -> None:
    assert out.class_logits.shape == (batch, NUM_CLASSES)
    assert out.patch_logits.shape == (batch, NUM_CLASSES)
    assert out.patch_cam.shape == (batch, NUM_CLASSES, *grid)
    assert out.attentions is not None and len(out.attentions) == depth
    tokens = NUM_CLASSES + grid[0] * grid[1]
    for attn in out.attentions:
        assert attn.shape == (batch, tokens, tokens)
        torch.testing.assert_close(attn.sum(-1), torch.ones(batch, tokens))


@pytest.mark.parametrize("size", [64, 96, 112])
def test_tiny_output_shapes(size: int) -> None:
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size), return_attention=True)
    check_output(out, 2, (size // 8, size // 8), depth=4)
    assert model(torch.randn(1, 3, size, size)).attentions is None


def test_non_square_input() -> None:
    out = tiny().eval()(torch.randn(1, 3, 64, 112), return_attention=True)
    check_output(out, 1, (8, 14), depth=4)


@pytest.mark.parametrize("mode", ["channels", "image"])
def test_standardised_input_ignores_a_site_wide_colour_and_brightness_change(mode: str) -> None:
    images = torch.randn(2, 3, 96, 96)
    # A darker, bluer stain: one gain for all channels and an offset per channel.
    restained = 0.6 * images + torch.tensor([-0.3, 0.1, 0.5])[:, None, None]
    for standardise, same in ((mode, True), ("none", False)):
        model = tiny(standardise_input=standardise).eval()
        with torch.no_grad():
            before, after = model(images).class_logits, model(restained).class_logits
        assert torch.allclose(before, after, atol=1e-4) == same


def test_standardised_channels_also_ignore_a_gain_per_channel() -> None:
    images = torch.randn(2, 3, 96, 96)
    restained = images * torch.tensor([0.6, 0.8, 1.4])[:, None, None]
    for mode, same in (("channels", True), ("image", False)):
        model = tiny(standardise_input=mode).eval()
        with torch.no_grad():
            before, after = model(images).class_logits, model(restained).class_logits
        assert torch.allclose(before, after, atol=1e-4) == same


def test_image_and_standardised_image_side_by_side_load_deit_into_the_raw_half(
    tmp_path: Path,
) -> None:
    state = deit_state()
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)
    model = tiny(standardise_input="both")
    assert model.patch_embed.proj.weight.shape[1] == 6
    load_deit_weights(model, path)
    raw, standardised = model.patch_embed.proj.weight.detach().split(3, dim=1)
    torch.testing.assert_close(raw, state["patch_embed.proj.weight"], rtol=0, atol=0)
    assert not standardised.any()
    check_output(model.eval()(torch.randn(2, 3, 64, 64), return_attention=True), 2, (8, 8), 4)


def test_an_unknown_standardisation_is_refused() -> None:
    with pytest.raises(ValueError, match="standardise_input='stain'"):
        tiny(standardise_input="stain")


def test_a_hospital_gets_its_own_standardisation_and_the_same_weights_as_the_others() -> None:
    cfg = compose_config(["+model.per_hospital.hospital_a.standardise_input=channels"]).model
    own, shared = (create_mct_model(cfg, NUM_CLASSES, hospital=h) for h in ("hospital_a", None))
    assert (own.standardise_input, shared.standardise_input) == ("channels", "none")
    assert create_mct_model(cfg, NUM_CLASSES, hospital="hospital_b").standardise_input == "none"
    shapes = {k: v.shape for k, v in shared.state_dict().items()}
    assert {k: v.shape for k, v in own.state_dict().items()} == shapes
    # The same weights give the site's standardised answer, not the shared one.
    own.load_state_dict(shared.state_dict())
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        restained = 0.5 * images + 0.2
        assert torch.allclose(
            own.eval()(images).class_logits, own(restained).class_logits, atol=1e-4
        )
        assert not torch.allclose(
            shared.eval()(images).class_logits, shared(restained).class_logits, atol=1e-4
        )


def test_deit_small_one_training_step() -> None:
    model = timm.create_model("mct_deit_small_patch16_224", num_classes=NUM_CLASSES)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (384, 12, 6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    before = model.head.weight.detach().clone()
    out = model(torch.randn(2, 3, 224, 224), return_attention=True)
    check_output(out, 2, (14, 14), depth=12)
    loss = mct_loss(out, multi_hot(2))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.head.weight)


def test_fused_and_explicit_attention_agree() -> None:
    model = tiny().eval()
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        fused, explicit = model(x), model(x, return_attention=True)
    torch.testing.assert_close(fused.class_logits, explicit.class_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.patch_logits, explicit.patch_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.patch_cam, explicit.patch_cam, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("return_attention", [False, True])
def test_every_trainable_parameter_gets_a_finite_gradient(return_attention: bool) -> None:
    model = tiny()
    loss = mct_loss(model(torch.randn(4, 3, 96, 96), return_attention), multi_hot(4))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"norm.weight", "norm.bias"}  # the final norm is never applied
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
    assert model.pos_embed.grad.abs().sum() > 0
    assert model.cls_token.grad.abs().sum() > 0


def test_final_norm_is_not_applied() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = model(x)
        model.norm.weight.fill_(3.0)
        model.norm.bias.fill_(1.0)
        after = model(x)
    torch.testing.assert_close(before.class_logits, after.class_logits)


def test_tiny_overfits_a_fixed_batch() -> None:
    model = tiny(drop_path_rate=0.0)
    images = torch.randn(8, 3, 96, 96)
    combos = [c for r in (1, 2) for c in itertools.combinations(range(NUM_CLASSES), r)]
    targets = torch.zeros(8, NUM_CLASSES)
    for row, combo in enumerate(combos[:8]):
        targets[row, list(combo)] = 1.0
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = mct_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def deit_state(
    img_size: int = 96, embed_dim: int = 96, distilled: bool = False
) -> dict[str, torch.Tensor]:
    """A DeiT-style state dict from timm's own ViT, i.e. the real key layout."""
    vit = VisionTransformer(
        img_size=img_size,
        patch_size=8,
        embed_dim=embed_dim,
        depth=4,
        num_heads=3,
        num_classes=1000,
    )
    state = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    state["cls_token"].normal_()
    state["pos_embed"].normal_()
    if distilled:
        state["dist_token"] = torch.randn(1, 1, embed_dim)
        state["head_dist.weight"] = torch.randn(1000, embed_dim)
        pos = state["pos_embed"]
        state["pos_embed"] = torch.cat((pos[:, :1], torch.randn(1, 1, embed_dim), pos[:, 1:]), 1)
    return state


@pytest.mark.parametrize("distilled", [False, True])
def test_load_deit_weights_replicates_class_token(
    tmp_path: Path, distilled: bool, caplog: pytest.LogCaptureFixture
) -> None:
    state = deit_state(distilled=distilled)
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)
    model = tiny()
    head_before = model.head.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="common.model"):
        load_deit_weights(model, path)
    assert "deit.pth" in caplog.text and "head.weight" in caplog.text

    prefix = 2 if distilled else 1
    cls_token, pos = state["cls_token"], state["pos_embed"]
    assert model.cls_token.shape == (1, NUM_CLASSES, 96)
    for c in range(NUM_CLASSES):
        torch.testing.assert_close(model.cls_token[:, c], cls_token[:, 0], rtol=0, atol=0)
        torch.testing.assert_close(model.pos_embed[:, c], pos[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(model.pos_embed[:, NUM_CLASSES:], pos[:, prefix:], rtol=0, atol=0)
    own = model.state_dict()
    for key in ("patch_embed.proj.weight", "blocks.3.attn.qkv.weight", "blocks.0.mlp.fc2.bias"):
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0)
    torch.testing.assert_close(model.head.weight, head_before, rtol=0, atol=0)


def test_load_deit_weights_resizes_patch_positions(tmp_path: Path) -> None:
    state = deit_state(img_size=64)  # 8x8 grid in the file, 12x12 in the model
    state["pos_embed"][:, 1:] = 0.25  # bicubic resampling keeps a constant field constant
    torch.save(state, tmp_path / "plain_state_dict.pth")
    model = tiny()
    load_deit_weights(model, tmp_path / "plain_state_dict.pth")
    assert model.pos_embed.shape == (1, NUM_CLASSES + 144, 96)
    patch_pos = model.pos_embed[:, NUM_CLASSES:]
    torch.testing.assert_close(patch_pos, torch.full_like(patch_pos, 0.25))


def test_load_deit_weights_rejects_other_embed_dim(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save({"model": deit_state(embed_dim=192)}, path)
    model = tiny()
    before = model.pos_embed.detach().clone()
    with pytest.raises(ValueError, match="wide.pth"):
        load_deit_weights(model, path)
    torch.testing.assert_close(model.pos_embed, before, rtol=0, atol=0)


def test_load_deit_weights_rejects_missing_backbone_keys(tmp_path: Path) -> None:
    state = deit_state()
    del state["blocks.2.attn.proj.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="blocks.2.attn.proj.weight"):
        load_deit_weights(tiny(), tmp_path / "partial.pth")


def test_load_deit_weights_maps_timm_deit_small_keys(tmp_path: Path) -> None:
    deit = timm.create_model("deit_small_patch16_224", pretrained=False)
    torch.save({"model": deit.state_dict()}, tmp_path / "deit_small.pth")
    model = timm.create_model("mct_deit_small_patch16_224", num_classes=NUM_CLASSES)
    load_deit_weights(model, tmp_path / "deit_small.pth")
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, deit.blocks[11].mlp.fc2.weight)


def test_load_deit_weights_rejects_pickled_objects(tmp_path: Path) -> None:
    path = tmp_path / "with_args.pth"
    torch.save({"model": deit_state(), "args": argparse.Namespace(lr=5e-4)}, path)
    with pytest.raises(CheckpointError, match="with_args.pth holds pickled Python objects"):
        load_deit_weights(tiny(), path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "truncated or not a PyTorch file"),
        ("text", "is not a PyTorch file"),
        ("cls_token_int", "expected one DeiT class token"),
        ("pos_embed_1d", "has no square patch grid"),
    ],
)
def test_a_damaged_deit_file_is_one_line_naming_it_also_before_a_run(
    tmp_path: Path, damage: str, message: str
) -> None:
    path = tmp_path / "deit.pth"
    state = deit_state()
    if damage == "cls_token_int":
        state["cls_token"] = 3
    if damage == "pos_embed_1d":
        state["pos_embed"] = torch.zeros(10)
    torch.save({"model": state}, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    if damage == "text":
        path.write_text("<html>Sign in</html>")
    with pytest.raises(CheckpointError, match=f"model.pretrained_file=.*deit.pth.*{message}"):
        load_deit_weights(tiny(), path)
    with pytest.raises(CheckpointError, match=f"model.pretrained_file=.*deit.pth.*{message}"):
        check_training_config(compose_config([f"model.pretrained_file={path}"]))


def test_load_deit_weights_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pth: file not found"):
        load_deit_weights(tiny(), tmp_path / "nope.pth")


def test_create_model_through_timm() -> None:
    model = timm.create_model("mct_tiny_patch8_96", num_classes=NUM_CLASSES)
    assert isinstance(model, MCTFormerV2)
    assert (model.num_classes, model.img_size, model.patch_size, model.embed_dim) == (5, 96, 8, 96)
    with pytest.raises(ValueError, match="pretrained_file"):
        timm.create_model("mct_tiny_patch8_96", pretrained=True, num_classes=NUM_CLASSES)


def test_create_mct_model_from_config(tmp_path: Path) -> None:
    cfg = {"name": "mct_tiny_patch8_96", "img_size": 64, "drop_path_rate": 0.0}
    model = create_mct_model(cfg, NUM_CLASSES)
    assert isinstance(model, MCTFormerV2) and model.img_size == 64
    assert model.pos_embed.shape == (1, NUM_CLASSES + 64, 96)

    state = deit_state()
    torch.save({"model": state}, tmp_path / "deit.pth")
    cfg = {**cfg, "img_size": 96, "pretrained_file": str(tmp_path / "deit.pth")}
    model = create_mct_model(cfg, NUM_CLASSES)
    torch.testing.assert_close(model.blocks[1].norm1.weight, state["blocks.1.norm1.weight"])


def test_create_mct_model_rejects_other_architectures() -> None:
    cfg = {"name": "vit_tiny_patch16_224", "img_size": 224, "drop_path_rate": 0.0}
    with pytest.raises(TypeError, match="vit_tiny_patch16_224"):
        create_mct_model(cfg, NUM_CLASSES)
