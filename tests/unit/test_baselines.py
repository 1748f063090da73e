"""post_training/baselines: the Otsu and centred-disk masks the learned stages are compared to."""

import numpy as np
import pytest

from post_training.baselines import disk_mask, label_cells, otsu_mask, stain_channel


def test_otsu_mask_finds_the_central_cell_among_distractors():
    image = np.full((60, 60, 3), (240, 225, 170), np.uint8)  # yellowish background
    yy, xx = np.mgrid[:60, :60]
    cell = (yy - 30) ** 2 + (xx - 31) ** 2 < 12**2
    cell_hole = (yy - 30) ** 2 + (xx - 31) ** 2 < 3**2
    red = (yy - 6) ** 2 + (xx - 6) ** 2 < 6**2
    image[cell] = (150, 80, 170)
    image[cell_hole] = (240, 225, 170)  # a pale spot inside the cell: filled
    image[red] = (160, 70, 80)
    mask = otsu_mask(image, "inverted_green")
    np.testing.assert_array_equal(mask, cell)
    with pytest.raises(ValueError, match="stain channel"):
        stain_channel(image, "hue")


def test_otsu_mask_of_a_blank_image_is_empty():
    for size in [(60, 60), (3, 5), (1, 1)]:
        blank = np.full((*size, 3), (240, 225, 170), np.uint8)
        assert not otsu_mask(blank, "inverted_green").any()


def test_disk_mask_and_labels():
    disk = disk_mask(21, 31, 0.5)  # radius 0.5 * 21 / 2 = 5.25
    assert disk[10, 15] and not disk[10, 21] and disk[10, 20]
    assert disk.sum() == pytest.approx(np.pi * 5.25**2, rel=0.1)
    labels = label_cells([disk], [3])[0]
    assert set(np.unique(labels)) == {0, 4}
