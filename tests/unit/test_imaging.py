"""common/imaging: Otsu threshold, 8-connected components, holes, distances, the central blob."""

from collections import deque

import numpy as np
import pytest
import torch

from common.imaging import (
    blob_nearest_centre,
    connected_components,
    distance_to,
    fill_holes,
    otsu_threshold,
)


def bfs_components(mask: np.ndarray) -> int:
    """Reference 8-connected component count by breadth-first search."""
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


def test_connected_components_hand_case_with_diagonal_link():
    mask = np.zeros((7, 9), bool)
    mask[1:3, 1:3] = True  # blob A
    mask[4:6, 5:8] = True  # blob B ...
    mask[3, 7] = mask[2, 8] = True  # ... reached diagonally
    labels = connected_components(mask).numpy()
    assert labels[0, 0] == 0
    assert len({labels[1, 1], labels[2, 2]}) == 1
    assert labels[2, 8] == labels[5, 5] != labels[1, 1]
    assert sorted(np.unique(labels)) == [0, 1, 2]


@pytest.mark.parametrize("density", [0.3, 0.55, 0.7])
def test_connected_components_match_bfs_on_random_masks(density):
    mask = np.random.default_rng(1).random((40, 50)) < density
    labels = connected_components(mask).numpy()
    assert len(np.unique(labels[mask])) == bfs_components(mask)
    assert (labels[~mask] == 0).all()


def test_connected_components_of_a_long_spiral():
    size = 41
    mask = np.zeros((size, size), bool)
    for k in range(0, size // 2, 4):
        mask[k, k : size - k] = True
        mask[k : size - k, size - 1 - k] = True
        mask[size - 1 - k, k + 2 : size - k] = True
        mask[k + 2 : size - k, k + 2] = True
    labels = connected_components(mask).numpy()
    assert len(np.unique(labels[mask])) == bfs_components(mask)


def test_fill_holes_fills_enclosed_background_only():
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    notch = ring.copy()
    notch[4, 2] = False  # a gap in the ring joins the hole to the outside
    filled = fill_holes(ring)
    assert filled[3:6, 3:6].all() and filled.sum() == 25
    assert not fill_holes(notch)[4, 4]


def test_fill_holes_fills_a_hole_closed_only_diagonally():
    # An 8-connected diamond outline: its inside touches the outside only through diagonal
    # gaps, which do not connect 4-connected background, so it is a hole.
    diamond = np.zeros((7, 7), bool)
    for y, x in [(1, 3), (2, 2), (2, 4), (3, 1), (3, 5), (4, 2), (4, 4), (5, 3)]:
        diamond[y, x] = True
    filled = fill_holes(diamond)
    assert filled[2, 3] and filled[3, 2] and filled[3, 3] and filled[3, 4] and filled[4, 3]
    assert filled.sum() == diamond.sum() + 5
    assert not filled[1, 2]  # outside the diamond


@pytest.mark.parametrize("density", [0.002, 0.05, 0.4])
def test_distance_to_matches_brute_force(density):
    rng = np.random.default_rng(3)
    mask = rng.random((23, 31)) < density
    mask[11, 15] = True
    inside = np.argwhere(mask)
    pixels = np.argwhere(np.ones_like(mask))
    brute = np.sqrt(((pixels[:, None, :] - inside[None]) ** 2).sum(-1)).min(1).reshape(mask.shape)
    np.testing.assert_allclose(distance_to(mask).numpy(), brute, rtol=1e-6)


def test_distance_to_a_mask_filling_the_image_is_zero():
    assert distance_to(torch.ones(5, 7, dtype=torch.bool)).abs().max() == 0
    line = torch.zeros(1, 5, dtype=torch.bool)
    line[0, 0] = True
    torch.testing.assert_close(distance_to(line), torch.arange(5.0)[None])


def test_blob_nearest_centre_keeps_the_central_blob_not_the_biggest():
    mask = np.zeros((21, 21), bool)
    mask[8:13, 8:13] = True  # small, central
    mask[0:8, 14:21] = True  # big, in a corner
    np.testing.assert_array_equal(blob_nearest_centre(mask), np.pad(np.ones((5, 5), bool), 8))
    assert not blob_nearest_centre(np.zeros((4, 4), bool)).any()


def test_otsu_threshold_splits_two_modes():
    values = np.concatenate([np.full(100, 0.2), np.full(50, 0.8)])
    t = otsu_threshold(values)
    assert 0.2 < t <= 0.8
    assert ((values >= t) == (values == 0.8)).all()
    assert not (np.full(5, 0.3) >= otsu_threshold(np.full(5, 0.3))).any()  # no upper class
