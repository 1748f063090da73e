"""common/imaging: Otsu threshold, 8-connected components, hole filling, the central blob."""

from collections import deque

import numpy as np
import pytest

from common.imaging import blob_nearest_centre, connected_components, fill_holes, otsu_threshold


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
    # every component carries its largest 1-based pixel index
    assert labels[1, 1] == 2 * 9 + 2 + 1
    assert labels[5, 5] == 5 * 9 + 7 + 1


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
    assert otsu_threshold(np.full(5, 0.3)) == 0.3
