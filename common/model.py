"""MCTformer-V2 (multi-class-token ViT with a patch-CAM head) on timm building blocks.

The layout and key names follow timm's ``VisionTransformer`` so an ImageNet DeiT state dict
maps onto the backbone 1:1 (docs/method.md section 1). Presets are registered with timm's model
registry on import, so ``timm.create_model("mct_tiny_patch8_96", num_classes=5)`` works.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from timm.models import register_model
from torch import nn

from common.torch_files import CheckpointError, read_torch_file

logger = logging.getLogger(__name__)

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)
# Prefixes of the patch-CAM and foreground heads: the only keys a DeiT checkpoint cannot provide.
_HEAD_PREFIXES = ("head.", "fg_head.")
# ImageNet heads and the distillation token of DeiT checkpoints have no counterpart here.
_DROPPED_PREFIXES = ("head.", "head_dist.")
_PATCH_WEIGHT = "patch_embed.proj.weight"
# Per-image input standardisation of MCTFormerV2 (its standardise_input).
STANDARDISE_MODES = ("none", "channels", "image", "both")


@dataclass
class MCTOutput:
    """Everything one forward pass yields, so training and map generation share a single call.

    Attributes
    ----------
    class_logits : torch.Tensor
        (B, C) mean over the embedding dim of each final class token.
    patch_logits : torch.Tensor
        (B, C) global average pool of ``patch_cam``.
    patch_cam : torch.Tensor
        (B, C, h, w) 3x3 conv head on the patch-token grid, before ReLU.
    attentions : list[torch.Tensor] | None
        One (B, T, T) head-mean softmax matrix per block, T = C + h*w with the class tokens
        first; only filled when asked for, because materialising them rules out fused attention.
    patch_features : torch.Tensor | None
        (B, D, h, w) final patch tokens on their grid, the input of the CAM head; the
        foreground levers (``common.levers``) pool them under a mask.
    foreground : torch.Tensor | None
        (B, 1, h, w) logits of the class-agnostic foreground head, when the model has one
        (``model.foreground_head``).
    """

    class_logits: torch.Tensor
    patch_logits: torch.Tensor
    patch_cam: torch.Tensor
    attentions: list[torch.Tensor] | None
    patch_features: torch.Tensor | None = None
    foreground: torch.Tensor | None = None


class Attention(nn.Module):
    """Multi-head self-attention that can expose its weights without slowing training.

    The fused ``scaled_dot_product_attention`` kernel never materialises the (T, T) weights, so
    the explicit softmax path runs only when the class/patch attention maps are requested.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over all tokens.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor | None]
            The projected output (B, T, D) and, when ``return_attention``, the head-mean softmax
            weights (B, T, T) taken before attention dropout, as in the reference.
        """
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        weights = None
        if return_attention:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            weights = attn.mean(dim=1)
            x = F.dropout(attn, drop) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, t, d)))
        return x, weights


class Block(nn.Module):
    """Pre-norm transformer block with timm's key names, passing attention weights through."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = _LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply the block; the second item is the head-mean attention or None."""
        y, weights = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, weights


def _resize_patch_pos(
    pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Bicubically resample (1, N, D) patch position embeddings, as the reference does."""
    if old_grid == new_grid:
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, *old_grid, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d)


class MCTFormerV2(nn.Module):
    """MCTformer-V2: one class token per class plus a conv patch-CAM head (docs/method.md §1).

    Parameters
    ----------
    num_classes : int
        Number of foreground classes C; also the number of class tokens.
    img_size : int
        Training resolution; other sizes divisible by ``patch_size`` resample the patch
        position embeddings bicubically.
    patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias : int, float, bool
        ViT geometry; the defaults are DeiT-S.
    drop_rate, attn_drop_rate, drop_path_rate : float
        Token/projection dropout, attention dropout and stochastic depth (reference: 0, 0, 0.1).
    foreground_head : bool
        Add a 1x1 conv that scores every patch as cell or background, class-agnostic. MCT has
        none; the foreground levers (background activation suppression, foreground contrast)
        train it, because without ImageNet weights the class maps alone light the background
        (docs/localization.md). Off keeps the reference model and its checkpoints.
    standardise_input : str
        Standardise every input image before the patch embedding, a stain normalisation that
        removes each site's overall colour cast and brightness so that one domain's labels can
        teach the other's images: ``"channels"`` centres and scales each colour channel by its
        own mean and SD, ``"image"`` centres each channel and scales all three by one SD (the
        colour balance within the image stays), ``"both"`` gives the patch embedding the
        image and its ``"channels"`` standardisation side by side (6 channels), so that the
        model keeps the colour that one site's cells are told apart by. ``"none"`` keeps the
        reference model.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        foreground_head: bool = False,
        standardise_input: str = "none",
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not divisible by patch_size={patch_size}")
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.img_size = img_size
        if standardise_input not in STANDARDISE_MODES:
            raise ValueError(
                f"standardise_input={standardise_input!r}: expected one of {STANDARDISE_MODES}"
            )
        self.standardise_input = standardise_input
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans * (2 if standardise_input == "both" else 1),
            embed_dim,
            flatten=False,
            strict_img_size=False,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_classes + num_patches, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate)
            for rate in rates
        )
        # The reference never applies the final norm: class scores are means over D of the raw
        # tokens, and after a LayerNorm (gamma=1 at init) every token's mean over D collapses to
        # mean(beta), i.e. identical scores for all classes. It is kept, frozen, only so DeiT
        # checkpoints load 1:1; frozen because it never receives a gradient.
        self.norm = _LayerNorm(embed_dim)
        self.norm.requires_grad_(False)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=3, padding=1)
        self.fg_head = nn.Conv2d(embed_dim, 1, kernel_size=1) if foreground_head else None

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        # timm ViT init; convolutions (patch embedding, CAM head) keep PyTorch defaults.
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Exclude the token and position embeddings from weight decay, as the reference does.

        timm's ``create_optimizer`` reads this, matching DeiT/MCT training.
        """
        return {"pos_embed", "cls_token"}

    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid_size:
            return self.pos_embed
        c = self.num_classes
        patch_pos = _resize_patch_pos(self.pos_embed[:, c:], self.grid_size, grid)
        return torch.cat((self.pos_embed[:, :c], patch_pos), dim=1)

    def forward_features(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run the backbone.

        Returns
        -------
        tuple[torch.Tensor, list[torch.Tensor] | None]
            Final tokens (B, C + h*w, D) without the final norm (see ``__init__``), class tokens
            first, and the per-block head-mean attention when ``return_attention``.
        """
        if self.standardise_input != "none":
            centred = x - x.mean(dim=(2, 3), keepdim=True)
            spread = (1, 2, 3) if self.standardise_input == "image" else (2, 3)
            scaled = centred / (centred.pow(2).mean(dim=spread, keepdim=True).sqrt() + 1e-6)
            x = torch.cat([x, scaled], dim=1) if self.standardise_input == "both" else scaled
        x = self.patch_embed(x)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self._pos_embed(grid))
        attentions: list[torch.Tensor] | None = [] if return_attention else None
        for block in self.blocks:
            x, weights = block(x, return_attention)
            if attentions is not None:
                attentions.append(weights)
        return x, attentions

    def patch_grid(
        self, tokens: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Final patch tokens (B, C + h*w, D) -> (B, D, h, w), the heads' input.

        A token count alone cannot tell a non-square grid, so ``grid_size`` is required for
        non-square inputs and inferred as square otherwise.
        """
        c = self.num_classes
        b, t, d = tokens.shape
        if grid_size is None:
            side = math.isqrt(t - c)
            if side * side != t - c:
                raise ValueError(f"{t - c} patch tokens are not a square grid; pass grid_size")
            grid_size = (side, side)
        return tokens[:, c:].transpose(1, 2).reshape(b, d, *grid_size)

    def forward_head(
        self, tokens: torch.Tensor, grid_size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Turn final tokens into class scores, patch scores and the patch CAM.

        Parameters
        ----------
        tokens : torch.Tensor
            (B, C + h*w, D) output of ``forward_features``.
        grid_size : tuple[int, int] | None
            (h, w) of the patch grid; a token count alone cannot tell a non-square grid, so it
            is required for non-square inputs and inferred as square otherwise.

        Returns
        -------
        tuple[torch.Tensor, torch.Tensor, torch.Tensor]
            ``class_logits`` (B, C), ``patch_logits`` (B, C) and ``patch_cam`` (B, C, h, w).
        """
        class_logits = tokens[:, : self.num_classes].mean(dim=-1)
        patch_cam = self.head(self.patch_grid(tokens, grid_size))
        patch_logits = F.adaptive_avg_pool2d(patch_cam, 1).flatten(1)
        return class_logits, patch_logits, patch_cam

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> MCTOutput:
        """Classify an image batch (B, 3, H, W), H and W divisible by the patch size."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens, attentions = self.forward_features(x, return_attention)
        features = self.patch_grid(tokens, grid)
        class_logits = tokens[:, : self.num_classes].mean(dim=-1)
        patch_cam = self.head(features)
        patch_logits = F.adaptive_avg_pool2d(patch_cam, 1).flatten(1)
        foreground = self.fg_head(features) if self.fg_head is not None else None
        return MCTOutput(class_logits, patch_logits, patch_cam, attentions, features, foreground)


def mct_loss(output: MCTOutput, targets: torch.Tensor) -> torch.Tensor:
    """MCTformer-V2 training loss: unweighted sum of the two multi-label soft-margin losses.

    Parameters
    ----------
    output : MCTOutput
        Model output; only the class and patch logits are used.
    targets : torch.Tensor
        (B, C) multi-hot float image labels.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    class_loss = F.multilabel_soft_margin_loss(output.class_logits, targets)
    return class_loss + F.multilabel_soft_margin_loss(output.patch_logits, targets)


def _prefix_tokens(state: Mapping[str, Any]) -> int:
    """Tokens before the patch grid in a DeiT ``pos_embed``: the class token (and distillation)."""
    return 2 if "dist_token" in state else 1


def read_deit_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a DeiT release file, checked to hold one class token and a square grid.

    Raises
    ------
    common.torch_files.CheckpointError
        One line naming the file: missing, not a PyTorch file, truncated, pickled objects, no
        DeiT state dict, or a class token or position grid of another form.
    """
    where = f"model.pretrained_file={path}"
    checkpoint = read_torch_file(path, "model.pretrained_file")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state, Mapping) or "cls_token" not in state or "pos_embed" not in state:
        raise CheckpointError(f"{where} holds no DeiT state dict with cls_token and pos_embed")
    cls_token, pos = state["cls_token"], state["pos_embed"]
    if not isinstance(cls_token, torch.Tensor) or cls_token.ndim != 3 or cls_token.shape[1] != 1:
        raise CheckpointError(
            f"{where}: expected one DeiT class token, got cls_token {cls_token!r:.60}"
        )
    num_prefix = _prefix_tokens(state)
    grid = pos.shape[1] - num_prefix if isinstance(pos, torch.Tensor) and pos.ndim == 3 else 0
    side = math.isqrt(max(grid, 0))
    if not side or side * side != grid:
        shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else repr(pos)[:40]
        raise CheckpointError(f"{where}: pos_embed {shape} has no square patch grid")
    return dict(state)


def load_deit_weights(model: MCTFormerV2, path: str | Path) -> None:
    """Initialise the backbone from a local ImageNet DeiT checkpoint, as MCT's ``--finetune``.

    The single DeiT class token and its position entry are replicated once per class, so all
    class tokens start identical; the patch position grid is resized bicubically when it
    differs; ImageNet heads and the distillation token are dropped. The patch-CAM head keeps
    its initialisation.

    Parameters
    ----------
    model : MCTFormerV2
        Model to load into, in place.
    path : str or Path
        ``torch.save`` file holding a state dict or ``{"model": state_dict}`` (DeiT release).

    Raises
    ------
    common.torch_files.CheckpointError
        If the file is missing or is no DeiT release (:func:`read_deit_state`).
    ValueError
        If it lacks backbone weights or its shapes do not fit the model (e.g. another
        embedding dim). The model is left untouched then.
    """
    path = Path(path)
    state = read_deit_state(path)
    num_prefix = _prefix_tokens(state)
    skipped = sorted(k for k in state if k.startswith(_DROPPED_PREFIXES) or k == "dist_token")
    state = {k: v for k, v in state.items() if k not in skipped}
    cls_token, pos = state["cls_token"], state["pos_embed"]
    old_side = math.isqrt(pos.shape[1] - num_prefix)

    c = model.num_classes
    state["cls_token"] = cls_token.repeat(1, c, 1)
    patch_pos = _resize_patch_pos(pos[:, num_prefix:], (old_side, old_side), model.grid_size)
    state["pos_embed"] = torch.cat((pos[:, :1].repeat(1, c, 1), patch_pos), dim=1)

    own = model.state_dict()
    patch = state.get(_PATCH_WEIGHT)
    if patch is not None and own[_PATCH_WEIGHT].shape[1] == 2 * patch.shape[1]:
        # standardise_input="both": the raw channels get DeiT's filters, the standardised ones
        # start at zero, so the loaded model first sees what DeiT saw.
        state[_PATCH_WEIGHT] = torch.cat((patch, torch.zeros_like(patch)), dim=1)
    head_keys = {k for k in own if k.startswith(_HEAD_PREFIXES)}
    missing = sorted(own.keys() - state.keys() - head_keys)
    if missing:
        raise ValueError(f"{path} lacks backbone weights: {', '.join(missing[:8])}")
    unexpected = sorted(state.keys() - own.keys())
    mismatched = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(f"{path} does not fit the model: {'; '.join(mismatched[:4])}")

    model.load_state_dict(state, strict=False)
    logger.info(
        "Loaded %d DeiT tensors from %s (class token x%d, patch grid %dx%d -> %dx%d); "
        "kept init: %s; skipped from file: %s",
        len(state) - len(unexpected),
        path,
        c,
        old_side,
        old_side,
        *model.grid_size,
        ", ".join(sorted(head_keys)),
        ", ".join(skipped + unexpected) or "none",
    )


def mct_presets() -> list[str]:
    """Names of the registered MCT presets (``model.name`` values)."""
    return timm.list_models("mct_*")


def hospital_standardisation(model_cfg: Mapping[str, Any], hospital: str | None) -> str:
    """The input standardisation ``hospital`` uses: its ``model.per_hospital`` entry, else shared.

    Standardising the input helps one stain and hurts another (Dataset 1's maps cover the whole
    cell only standardised, Dataset 2 tells its white cell from red cells only by raw colour;
    docs/localization.md), and the mode changes no weight, so sites of one federation may differ.
    Only ``standardise_input`` may differ, and not to or from ``both``: every other model key,
    and ``both``'s six input channels, set the shapes of the weights the sites average.

    Raises
    ------
    ValueError
        Naming the entry, for another key or a mode that would change the weights' shapes.
    """
    shared = str(model_cfg.get("standardise_input", "none"))
    own = (model_cfg.get("per_hospital") or {}).get(hospital) if hospital else None
    if not own:
        return shared
    where = f"model.per_hospital.{hospital}"
    other = sorted(set(own) - {"standardise_input"})
    if other:
        raise ValueError(
            f"{where}: only standardise_input may differ between hospitals, not {other} "
            "(the other model keys set the shapes of the weights the hospitals average)"
        )
    mode = str(own.get("standardise_input", shared))
    allowed = tuple(m for m in STANDARDISE_MODES if m != "both")
    if "both" in (mode, shared) and mode != shared:
        raise ValueError(
            f"{where}.standardise_input={mode} with model.standardise_input={shared}: 'both' has "
            f"six input channels, so a hospital may not differ from or to it; use one of {allowed}"
        )
    if mode not in STANDARDISE_MODES:
        raise ValueError(f"{where}.standardise_input={mode!r}: expected one of {allowed}")
    return mode


def create_mct_model(
    model_cfg: Mapping[str, Any],
    num_classes: int,
    hospital: str | None = None,
    *,
    load_pretrained: bool = True,
) -> MCTFormerV2:
    """Build the configured preset and optionally load a local DeiT checkpoint.

    Parameters
    ----------
    model_cfg : Mapping
        The ``model`` config group: ``name`` (a registered ``mct_*`` preset), ``img_size``,
        ``drop_path_rate``, optional ``pretrained_file``, ``foreground_head``,
        ``standardise_input`` and ``per_hospital``.
    num_classes : int
        Number of foreground classes.
    hospital : str | None
        The hospital whose images the model will see, for its own input standardisation
        (:func:`hospital_standardisation`); None (the server, pooled training) uses the shared one.
    load_pretrained : bool
        Load ``pretrained_file`` (the run's starting point, read where the run starts). False
        where the weights come from elsewhere (a model file, the global model a hospital
        receives): a hospital need not hold the file that the server started from.

    Returns
    -------
    MCTFormerV2
        The model, on CPU.
    """
    # Passed only when on, so that a foreign timm name still fails on its type, below.
    extra: dict[str, Any] = {"foreground_head": True} if model_cfg.get("foreground_head") else {}
    standardisation = hospital_standardisation(model_cfg, hospital)
    if standardisation != "none":
        extra["standardise_input"] = standardisation
    model = timm.create_model(
        model_cfg["name"],
        num_classes=num_classes,
        img_size=model_cfg["img_size"],
        drop_path_rate=model_cfg["drop_path_rate"],
        **extra,
    )
    if not isinstance(model, MCTFormerV2):
        raise TypeError(f"model.name={model_cfg['name']!r} is not an MCTFormerV2 preset")
    if load_pretrained and model_cfg.get("pretrained_file"):
        load_deit_weights(model, model_cfg["pretrained_file"])
    return model


def _create_preset(pretrained: bool, preset: dict[str, Any], kwargs: dict[str, Any]) -> MCTFormerV2:
    if pretrained:
        raise ValueError(
            "MCTFormerV2 presets have no downloadable weights; set model.pretrained_file to a "
            "local DeiT checkpoint instead (see load_deit_weights)"
        )
    # Hub-related arguments that timm.create_model always passes to entrypoints.
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return MCTFormerV2(**{**preset, **kwargs})


@register_model
def mct_tiny_patch8_96(pretrained: bool = False, **kwargs: Any) -> MCTFormerV2:
    """Build the CPU preset: a 96 px step on 32 images stays well under a second on 2 cores."""
    preset = dict(img_size=96, patch_size=8, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0)
    return _create_preset(pretrained, preset, kwargs)


@register_model
def mct_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> MCTFormerV2:
    """Build the paper's DeiT-S backbone (docs/method.md section 1)."""
    preset = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)
    return _create_preset(pretrained, preset, kwargs)
