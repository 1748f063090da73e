"""Files the jobs write (post_training/artifacts.py): their names, and strip-wise work equal to
whole-image work."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageOps

from post_training import artifacts
from post_training.artifacts import (
    PALETTE,
    UNCERTAIN_COLOUR,
    class_colours,
    overlay,
    read_label_png,
    rgb_array,
    sample_stems,
    save_grid,
    save_label_png,
    save_overlay,
)


def whole_image_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The overlay computed on the whole image at once (the formula before strips)."""
    out = image.astype(np.float64)
    colours = PALETTE[(labels.astype(np.int64) - 1) % len(PALETTE)]
    colours[labels == 255] = UNCERTAIN_COLOUR
    painted = labels > 0
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edge &= painted
    out[edge] = colours[edge]
    return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("strip_pixels", [1, 37, 1 << 18])
def test_overlay_in_strips_equals_the_whole_image_overlay(strip_pixels, monkeypatch, tmp_path):
    monkeypatch.setattr(artifacts, "OVERLAY_STRIP_PIXELS", strip_pixels)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (53, 29, 3), dtype=np.uint8)
    labels = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), (53, 29), p=[0.5, 0.2, 0.2, 0.1])
    expected = whole_image_overlay(image, labels)
    np.testing.assert_array_equal(overlay(image, labels), expected)
    save_overlay(tmp_path / "o.png", image, labels)
    with Image.open(tmp_path / "o.png") as written:
        np.testing.assert_array_equal(np.asarray(written), expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_rgb_array_equals_the_converted_image(mode, monkeypatch, tmp_path):
    monkeypatch.setattr(artifacts, "OVERLAY_STRIP_PIXELS", 50)  # strips of 2 rows
    rng = np.random.default_rng(1)
    picture = Image.fromarray(rng.integers(0, 255, (23, 25, 3), dtype=np.uint8)).convert(mode)
    array = rgb_array(picture)
    np.testing.assert_array_equal(array, np.asarray(picture.convert("RGB")))
    assert array.dtype == np.uint8 and array.flags.writeable
    picture.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as reread:
        np.testing.assert_array_equal(rgb_array(reread), array)


def test_a_sixteen_bit_grey_image_is_scaled_onto_eight_bits(tmp_path):
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
    picture = Image.fromarray(ramp)
    assert picture.mode == "I;16"
    expected = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None], 3, axis=2)
    np.testing.assert_array_equal(rgb_array(picture), expected)
    picture.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as reread:
        np.testing.assert_array_equal(rgb_array(reread), expected)
    # The same values as 32-bit integers, as Pillow opens some 16-bit files.
    np.testing.assert_array_equal(rgb_array(picture.convert("I")), expected)
    with pytest.raises(ValueError, match="32-bit integer pixels from 0 to 70000"):
        rgb_array(Image.fromarray(np.array([[0, 70000]], dtype=np.int32), "I"))
    # 8-bit values saved in 16 bits (a mask, say) are kept; float values in 0..1 are scaled.
    small = np.array([[0, 128, 255]], dtype=np.uint16)
    np.testing.assert_array_equal(rgb_array(Image.fromarray(small))[..., 0], small)
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    np.testing.assert_array_equal(rgb_array(unit)[..., 0], [[0, 128, 255]])


@pytest.mark.parametrize(("bits", "brightest"), [(10, 1000), (12, 4095), (12, 3000), (14, 9000)])
def test_a_camera_image_of_fewer_than_16_bits_is_scaled_from_its_own_bit_depth(bits, brightest):
    values = np.array([[0, brightest // 3, brightest]], dtype=np.uint16)
    grey = rgb_array(Image.fromarray(values))[..., 0]
    top = 2**bits - 1
    np.testing.assert_array_equal(grey, np.rint(values.astype(float) * 255 / top).astype(np.uint8))


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_an_image_is_read_as_its_exif_orientation_shows_it(tmp_path, orientation):
    pixels = np.zeros((4, 6, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # a mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "sideways.png", exif=exif)
    with Image.open(tmp_path / "sideways.png") as image:
        shown = np.asarray(ImageOps.exif_transpose(image))
        array = rgb_array(image)
    np.testing.assert_array_equal(array, shown)
    assert array.shape == ((4, 6, 3) if orientation <= 4 else (6, 4, 3))


def test_a_failed_write_leaves_neither_a_half_file_nor_a_temporary(tmp_path, monkeypatch):
    labels = np.ones((4, 5), dtype=np.uint8)
    save_label_png(tmp_path / "a.png", labels)

    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"half a PNG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_label_png(tmp_path / "a.png", np.zeros((4, 5), dtype=np.uint8))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
    np.testing.assert_array_equal(read_label_png(tmp_path / "a.png"), labels)


def test_stems_are_readable_and_ids_that_read_alike_still_get_files_of_their_own():
    ids = ["Dataset 1/001.bmp", "Neutrophil/a.jpg", "Neutrophil/a.png", "x/a b.jpg", "x/a_b.jpg"]
    stems = sample_stems(ids)
    assert stems[:1] == ["Dataset_1__001"]
    assert len(set(stems)) == len(ids)
    assert all(stem.startswith("Neutrophil__a-") for stem in stems[1:3])
    assert all(stem.startswith("x__a_b-") for stem in stems[3:])
    assert sample_stems(ids) == stems  # the same split gives the same names when read back


def test_names_that_are_not_utf8_get_stems_of_their_own():
    # Latin-1 names from an old share, as Python lists them: Zelle_ä1.png and Zelle_ö1.png
    ids = [os.fsdecode(b"n/Zelle_\xe41.png"), os.fsdecode(b"n/Zelle_\xf61.png")]
    stems = sample_stems(ids)
    assert len(set(stems)) == 2 and all(stem.startswith("n__Zelle__1-") for stem in stems)


def test_a_figure_names_the_class_of_each_overlay_colour(tmp_path):
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
    colours = class_colours(classes)
    image = np.full((32, 32, 3), 200, np.uint8)
    labels = np.zeros((32, 32), np.uint8)
    labels[8:24, 8:24] = 2  # label k is class k - 1: lymphocyte
    painted = overlay(image, labels)
    save_grid(tmp_path / "plain.png", [[image, painted]], ["image", "overlay"], tile=64)
    save_grid(tmp_path / "key.png", [[image, painted]], ["image", "overlay"], 64, colours)
    plain, key = (np.asarray(Image.open(tmp_path / n)) for n in ("plain.png", "key.png"))
    assert key.shape[1] == plain.shape[1] and key.shape[0] > plain.shape[0]
    footer = key[plain.shape[0] :].reshape(-1, 3)
    found = {tuple(int(c) for c in pixel) for pixel in footer}
    assert all(colour in found for colour in colours.values())  # a square of each, lines wrapped
