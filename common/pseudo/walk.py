"""The random walk shared by PSA and the transformer-affinity walk (docs/method.md section 3).

Scores of [background; classes] at grid resolution are propagated with a transition matrix
built from a non-negative affinity: W = A^beta, T = W / colsum(W), raised to t = 2^logt by
squaring ``logt`` times, then ``scores @ T``. Because every column of T sums to one, each
output column is a convex combination of input columns: a constant background score stays
exactly that constant, which lets a background threshold be chosen after walking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def transition_matrix(affinity: torch.Tensor, beta: float, logt: int) -> torch.Tensor:
    """T^(2^logt) of the column-normalised W = affinity^beta.

    Each column is scaled to a maximum of 1 before the power: the scale cancels in the
    normalisation, and a node whose affinities are all small (a patch that attends mostly to
    the class tokens) would otherwise underflow to a column that no longer sums to one.

    Parameters
    ----------
    affinity
        (..., N, N) non-negative; zero where two nodes are not connected.
    beta
        Elementwise exponent that sharpens the affinities (reference 8).
    logt
        Number of squarings; t = 2^logt steps (PSA 8, MCT 6).

    Returns
    -------
    torch.Tensor
        (..., N, N) transition matrix whose columns sum to one.
    """
    if logt < 0:
        raise ValueError(f"logt must be >= 0, got {logt}")
    affinity = affinity.clamp(min=0)
    weights = (affinity / affinity.amax(dim=-2, keepdim=True).clamp(min=1e-30)) ** beta
    transition = weights / weights.sum(dim=-2, keepdim=True).clamp(min=1e-30)
    for _ in range(logt):
        transition = transition @ transition
    return transition


def walk_on_grid(
    scores: torch.Tensor,
    transition: torch.Tensor,
    grid: tuple[int, int],
    size: Sequence[int],
) -> torch.Tensor:
    """Average-pool scores to the grid, walk, and bilinearly upsample back to ``size``.

    Parameters
    ----------
    scores
        (K, H, W) per-label scores at image size.
    transition
        (N, N) from :func:`transition_matrix`, N = grid h * w.
    grid
        (h, w) of the walk.
    size
        (H', W') of the output, usually (H, W).

    Returns
    -------
    torch.Tensor
        (K, H', W') walked scores.
    """
    pooled = F.adaptive_avg_pool2d(scores[None], grid)[0]
    walked = (pooled.flatten(1) @ transition).reshape(-1, *grid)
    return F.interpolate(walked[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
