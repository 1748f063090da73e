"""The colour-split probe: the smaller colour cluster is scored against cell and nucleus."""

import numpy as np

from benchmarks.colour_clusters import cell_side, hospital_scores
from common.data import BACKGROUND, CYTOPLASM, NUCLEUS


def _cell_image() -> tuple[np.ndarray, np.ndarray]:
    """A pale background, a lilac cytoplasm disc and a dark nucleus, with its exact mask."""
    yy, xx = np.mgrid[:64, :64]
    radius = np.hypot(yy - 30, xx - 34)
    mask = np.full((64, 64), BACKGROUND, np.uint8)
    mask[radius < 20] = CYTOPLASM
    mask[radius < 9] = NUCLEUS
    colours = {BACKGROUND: (240, 225, 215), CYTOPLASM: (150, 120, 200), NUCLEUS: (70, 30, 110)}
    image = np.zeros((64, 64, 3), np.uint8)
    for value, colour in colours.items():
        image[mask == value] = colour
    return image, mask


def test_the_smaller_of_two_colour_clusters_is_the_cell_when_the_cell_is_one_colour():
    image, mask = _cell_image()
    side = cell_side(image.astype(np.float64) / 255.0)
    assert np.array_equal(side, mask != BACKGROUND)
    # Three clusters find nucleus, cytoplasm and background: the cell is all but the largest.
    assert np.array_equal(cell_side(image.astype(np.float64) / 255.0, 3), mask != BACKGROUND)


def test_a_cytoplasm_like_the_background_leaves_the_nucleus_as_the_split():
    image, mask = _cell_image()
    image[mask == CYTOPLASM] = (230, 215, 215)  # pale, nearly the plasma's colour
    scores = hospital_scores([image], [mask])["rgb"]
    assert scores["nucleus_iou"] > 0.9 > 0.5 > scores["cell_iou"]
    # With a third cluster for the cytoplasm, the cell is whole again.
    assert hospital_scores([image], [mask], 3)["rgb"]["cell_iou"] > 0.9
