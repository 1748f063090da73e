"""Class localization maps from the MCT model: class-attention x patch-CAM (method.md section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.model import MCTOutput


def fused_maps(output: MCTOutput, last_k_layers: int) -> torch.Tensor:
    """Class-to-patch attention summed over the last K layers times ReLU(patch-CAM), (B, C, h, w).

    A sum, not a mean, as in the reference code: the min-max that follows removes the scale.
    """
    if output.attentions is None:
        raise ValueError("fused_maps needs the model output of forward(..., return_attention=True)")
    b, c, h, w = output.patch_cam.shape
    attention = torch.stack(output.attentions[-last_k_layers:]).sum(0)
    class_to_patch = attention[:, :c, c:].reshape(b, c, h, w)
    return class_to_patch * F.relu(output.patch_cam)


def normalise_maps(
    maps: torch.Tensor, size: tuple[int, int], present: torch.Tensor
) -> torch.Tensor:
    """Upsample to image size, zero absent classes, min-max each present class into [0, 1]."""
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    maps = maps * present[:, :, None, None].to(maps.dtype)
    low = maps.amin(dim=(2, 3), keepdim=True)
    high = maps.amax(dim=(2, 3), keepdim=True)
    maps = (maps - low) / (high - low + 1e-8)
    return maps * present[:, :, None, None].to(maps.dtype)
