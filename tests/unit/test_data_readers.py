"""Readers (zxaoyou on the real data, raabin and class_folders on small trees), splits, tensors."""

from __future__ import annotations

import os
import shutil
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, TiffImagePlugin

from common.config import compose_config
from common.data import (
    BACKGROUND,
    CYTOPLASM,
    NUCLEUS,
    DataVerificationError,
    SplitSpec,
    check_split,
    fold_indices,
    hospital_names,
    hospital_split,
    load_hospital,
    split_digest,
    split_indices,
    split_tensors,
    verify_data,
)
from common.data.readers import MATEK19_CLASSES
from common.errors import JobError
from common.imaging import load_checked
from tests.image_files import write_rgb48_png, write_rgb565_bmp, write_rgb_tiff

REAL_ROOT = Path(__file__).resolve().parents[2].parent / "shared/data/segmentation_WBC-dev"
FIVE = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
IMAGE_DESCRIPTION = 0x010E  # an EXIF (and TIFF) tag


@pytest.fixture(scope="module")
def real_cfg():
    if not REAL_ROOT.is_dir():
        pytest.skip(f"real zxaoyou data not found at {REAL_ROOT}")
    return compose_config(["data=wbc_zxaoyou", f"data.root={REAL_ROOT}"]).data


def data_cfg(hospitals: dict, classes: list[str] = FIVE, seed: int = 0):
    return OmegaConf.create(
        {
            "classes": classes,
            "split": {"seed": seed, "fractions": [0.6, 0.2, 0.2]},
            "hospitals": hospitals,
        }
    )


def grey_mask(height: int, width: int) -> np.ndarray:
    """A 0/128/255 mask: a centred cell with a nucleus, as the datasets store them."""
    yy, xx = np.mgrid[0:height, 0:width]
    dist = np.hypot(yy - height / 2, xx - width / 2)
    mask = np.zeros((height, width), np.uint8)
    mask[dist < min(height, width) * 0.4] = 128
    mask[dist < min(height, width) * 0.2] = 255
    return mask


def write_image(path: Path, height: int, width: int, mode: str = "RGB", seed: int = 0) -> None:
    """Random pixels, drawn from ``seed`` and the path: two files are two images, not copies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = len(mode)
    rng = np.random.default_rng([seed, zlib.crc32(os.fsencode(path))])
    pixels = rng.integers(0, 256, (height, width, channels), np.uint8)
    Image.fromarray(pixels, mode).save(path)


def own_exif(exif: Image.Exif, number: int) -> Image.Exif:
    """``exif`` with ``number`` as the image's description, so files of one picture differ.

    A byte-identical copy of an image is refused (``repeated_image``); the pixels stay alike.
    """
    own = Image.Exif()
    own.update(exif)
    own[IMAGE_DESCRIPTION] = str(number)
    return own


# ---- zxaoyou, on the real data ----

REAL_COUNTS = {
    "dataset1": (151, {"neutrophil": 88, "lymphocyte": 27, "monocyte": 24, "eosinophil": 11,
                       "basophil": 1}),
    "dataset2": (52, {"neutrophil": 17, "lymphocyte": 19, "monocyte": 8, "eosinophil": 6,
                      "basophil": 2}),
}  # fmt: skip


@pytest.mark.parametrize("name", ["dataset1", "dataset2"])
def test_zxaoyou_real_counts_and_masks(real_cfg, name):
    data = load_hospital(real_cfg, name)
    count, classes = REAL_COUNTS[name]
    assert len(data) == len(data.labels) == len(data.masks) == len(data.sample_ids) == count
    assert data.labels.dtype == np.int64
    assert Counter(data.classes[i] for i in data.labels) == classes
    with_both = 0
    for image, mask in zip(data.images, data.masks, strict=True):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {BACKGROUND, CYTOPLASM, NUCLEUS}
        with_both += bool((mask == CYTOPLASM).any() and (mask == NUCLEUS).any())
    assert with_both >= 0.9 * count
    subset = "Dataset 1" if name == "dataset1" else "Dataset 2"
    assert all(sid.startswith(f"{subset}/") and sid.endswith(".bmp") for sid in data.sample_ids)


def test_real_data_verifies_clean_and_load_is_cached(real_cfg):
    assert hospital_names(real_cfg) == ["dataset1", "dataset2"]
    assert verify_data(real_cfg) == []
    first = load_hospital(real_cfg, "dataset2")
    assert load_hospital(real_cfg, "dataset2") is first
    assert not first.images[0].flags.writeable, "cached arrays are shared, so read-only"


def test_relative_root_resolves_against_cwd(real_cfg, monkeypatch):
    monkeypatch.chdir(REAL_ROOT.parent)
    cfg = compose_config(["data=wbc_zxaoyou", f"data.root={REAL_ROOT.name}"]).data
    assert len(load_hospital(cfg, "dataset2")) == 52


def test_zxaoyou_class_map_override(real_cfg):
    cfg = OmegaConf.create(OmegaConf.to_container(real_cfg))  # composed configs are struct
    cfg.hospitals.dataset2.class_map = {5: "eosinophil"}  # basophils relabelled; ids are ints
    data = load_hospital(cfg, "dataset2")
    assert Counter(data.classes[i] for i in data.labels)["eosinophil"] == 6 + 2


# ---- raabin and class_folders, on trees written here ----


def test_raabin_reader(tmp_path):
    for cls, count in [("Neutrophil", 3), ("basophil", 2)]:
        for i in range(count):
            image = tmp_path / "GrTh/Original" / cls / f"{i}.jpg"
            write_image(image, 60, 64, seed=i)
            mask = tmp_path / "GrTh/Ground Truth" / cls / f"{i}.jpg"
            mask.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(grey_mask(60, 64)).save(mask, quality=75)
    cfg = data_cfg({"raabin": {"format": "raabin", "root": str(tmp_path)}})
    assert verify_data(cfg) == []
    data = load_hospital(cfg, "raabin")
    assert Counter(data.classes[i] for i in data.labels) == {"neutrophil": 3, "basophil": 2}
    expected = grey_mask(60, 64) // 100  # 0, 128, 255 -> 0, 1, 2
    for image, mask in zip(data.images, data.masks, strict=True):
        assert image.shape == (60, 64, 3) and mask.shape == (60, 64)
        assert set(np.unique(mask)) <= {0, 1, 2}
        assert (mask == expected).mean() > 0.97, "grey thresholds tolerate JPEG noise"
    assert data.sample_ids[0] == "GrTh/Original/Neutrophil/0.jpg"


def test_class_folders_matek_rgba_tiff(tmp_path):
    root = tmp_path / "AML-Cytomorphology"
    for cls in ["BAS", "NGS", "MYO"]:
        for i in range(2):
            write_image(root / cls / f"{cls}_{i:04d}.tiff", 40, 40, mode="RGBA", seed=i)
    (root / "annotations.dat").write_text("not an image\n")
    classes = list(dict.fromkeys(MATEK19_CLASSES.values()))
    spec = {"format": "class_folders", "root": str(root), "class_map": "matek19"}
    cfg = data_cfg({"matek": spec}, classes=classes)
    data = load_hospital(cfg, "matek")
    assert data.masks is None
    assert all(image.shape == (40, 40, 3) for image in data.images), "RGBA read as RGB"
    names = Counter(data.classes[i] for i in data.labels)
    assert names == {"basophil": 2, "neutrophil": 2, "myeloblast": 2}


def test_sixteen_bit_images_are_scaled_not_clipped_and_float_images_refused(tmp_path):
    ramp = np.linspace(0, 65535, 20 * 24).reshape(20, 24).astype(np.uint16)
    for c, cls in enumerate(FIVE):
        (tmp_path / "h" / cls).mkdir(parents=True)
        for i in range(3):
            path = tmp_path / "h" / cls / f"{i}.png"
            Image.fromarray(ramp).save(path, exif=own_exif(Image.Exif(), 3 * c + i))
    shutil.copytree(tmp_path / "h", tmp_path / "f")
    Image.fromarray(ramp.astype(np.float32) / 7).save(tmp_path / "f" / "monocyte" / "f.tif")

    def hospital(folder: str):
        spec = {"format": "class_folders", "root": str(tmp_path / folder)}
        return load_hospital(data_cfg({"h": spec}), "h")

    image = hospital("h").images[0]
    # Scaled onto 0..255 (Pillow's convert clipped at 255: a nearly white image, mean 254).
    assert image.min() == 0 and image.max() == 255 and abs(float(image.mean()) - 127.5) < 1
    with pytest.raises(DataVerificationError, match="floating-point pixels from 0 to 9362"):
        hospital("f")


def test_a_colour_image_of_a_narrow_camera_in_16_bits_is_refused_not_read_dark(tmp_path):
    rng = np.random.default_rng(0)
    eight = {}
    for cls in FIVE:
        for i in range(3):
            eight[cls, i] = rng.integers(0, 256, (20, 24, 3)).astype(np.uint16)
            write_rgb48_png(tmp_path / "h" / cls / f"{i}.png", eight[cls, i] * 257)  # all 16 bits
    write_rgb48_png(tmp_path / "h" / "monocyte" / "cam12.png", eight["monocyte", 0] * 16)
    spec = {"format": "class_folders", "root": str(tmp_path / "h")}
    [problem] = verify_data(data_cfg({"h": spec}))
    assert problem.kind == "unreadable_image" and problem.path.endswith("cam12.png")
    assert "16 bits per colour channel, all values below 4096" in problem.detail
    (tmp_path / "h" / "monocyte" / "cam12.png").unlink()
    data = load_hospital(data_cfg({"h": spec}), "h")
    # basophil/0.png, the first listed: the top bytes of full 16 bits
    np.testing.assert_array_equal(data.images[0], eight["basophil", 0])


@pytest.mark.parametrize(
    ("bits", "planar"), [(16, True), (16, False), (8, True)], ids=["16planar", "16", "8planar"]
)
def test_a_tiff_of_16_bit_colour_planes_is_refused_not_read_scrambled(bits, planar, tmp_path):
    values = np.random.default_rng(0).integers(0, 2**bits, (6, 5, 3)).astype(f"uint{bits}")
    path = tmp_path / "cell.tif"
    write_rgb_tiff(path, values, planar=planar)
    with Image.open(path) as image:
        if bits == 16 and planar:  # Pillow reads each plane's bytes as 8-bit samples
            with pytest.raises(ValueError, match="16 bits per colour channel in separate colour"):
                load_checked(image)
        else:
            top_bytes = values >> 8 if bits == 16 else values
            np.testing.assert_array_equal(np.asarray(load_checked(image)), top_bytes)


@pytest.mark.parametrize(
    ("name", "refused"),
    [("rgba12.png", True), ("eight48.png", True), ("dark565.bmp", False)],
)
def test_the_16_bit_colour_check_reads_colours_of_16_bit_samples_only(name, refused, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / name
    if name == "rgba12.png":  # a 12-bit camera's colours behind an opaque alpha of 65535
        camera = rng.integers(0, 4096, (8, 8, 3))
        write_rgb48_png(path, np.concatenate([camera, np.full((8, 8, 1), 65535)], axis=2))
    elif name == "eight48.png":  # 8-bit values in 16-bit samples: their top bytes are all 0
        write_rgb48_png(path, rng.integers(0, 256, (8, 8, 3)).astype(np.uint16))
    else:  # 16 bits a pixel, 5-6-5: Pillow's raw mode "BGR;16" is 8 bits a sample
        write_rgb565_bmp(path, rng.integers(0, 4, (8, 8), dtype=np.uint16))
    with Image.open(path) as image:
        if refused:
            with pytest.raises(
                ValueError, match="16 bits per colour channel.*read (all black|at least)"
            ):
                load_checked(image)
        else:
            assert load_checked(image).size == (8, 8)


def test_images_are_read_turned_as_their_exif_orientation_shows_them(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8  # shown turned a quarter anticlockwise
    for c, cls in enumerate(FIVE):
        (tmp_path / "h" / cls).mkdir(parents=True)
        for i in range(3):
            image = Image.new("RGB", (24, 20), "white")
            image.save(tmp_path / "h" / cls / f"{i}.jpg", exif=own_exif(exif, 3 * c + i))
    spec = {"format": "class_folders", "root": str(tmp_path / "h")}
    data = load_hospital(data_cfg({"h": spec}), "h")
    assert {image.shape for image in data.images} == {(24, 20, 3)}


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])  # Pillow turns a TIFF itself as it loads
@pytest.mark.parametrize("drawn_on", ["stored pixels", "image as shown"])
def test_a_mask_without_a_tag_lies_on_its_turned_image(tmp_path, drawn_on, suffix):
    """Turned with its image when stored as the image is; kept when drawn on the shown image."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 36 wide and 30 high, shown turned a quarter clockwise
    stored = np.full((30, 36, 3), 255, np.uint8)
    stored[:8, :6] = (90, 40, 120)  # a nucleus in the stored top-left corner
    mask = np.zeros((30, 36), np.uint8)
    mask[:8, :6] = 255
    if drawn_on == "image as shown":
        mask = np.rot90(mask, -1)  # where a tool that shows the turned image drew it
    data = _turned_image_with_mask(tmp_path, stored, exif, mask, Image.Exif(), suffix)
    image, truth = data.images[0], data.masks[0]
    assert image.shape[:2] == truth.shape == (36, 30)
    nucleus = image.mean(axis=2) < 200
    assert (truth[nucleus] > 0).mean() > 0.9 and (nucleus[truth > 0]).mean() > 0.9


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_a_mask_tagged_upright_is_not_turned_with_its_image(tmp_path, suffix):
    # Exporters that turn the pixels write orientation 1: the mask is as its tag says, though
    # it has the stored size of an image shown turned half a turn.
    exif = Image.Exif()
    exif[0x0112] = 3
    stored = np.full((30, 36, 3), 255, np.uint8)
    stored[:8, :6] = (90, 40, 120)  # shown in the bottom-right corner
    mask = np.zeros((30, 36), np.uint8)
    mask[-8:, -6:] = 255  # drawn on the image as shown
    upright = Image.Exif()
    upright[0x0112] = 1
    data = _turned_image_with_mask(tmp_path, stored, exif, mask, upright, suffix)
    image, truth = data.images[0], data.masks[0]
    nucleus = image.mean(axis=2) < 200
    assert nucleus[-8:, -6:].all() and (truth > 0).sum() == nucleus.sum()
    assert (truth[nucleus] > 0).all()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA"])
def test_a_turned_tiff_mask_of_its_own_tag_lies_on_its_image(tmp_path, mode):
    # A grey TIFF mask was refused (mask_size_mismatch): Pillow scrambled it, turning it as it
    # loaded it from its mapped file; a grey TIFF image was trained on scrambled pixels.
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.full((30, 36, 3), 255, np.uint8)
    stored[:8, :6] = (90, 40, 120)
    mask = np.zeros((30, 36), np.uint8)
    mask[:8, :6] = 255
    for c, cls in enumerate(FIVE):
        for folder in ("images", "masks"):
            (tmp_path / folder / cls).mkdir(parents=True)
        image = Image.fromarray(stored).convert(mode)
        image.save(tmp_path / "images" / cls / "0.tif", exif=own_exif(exif, c))
        Image.fromarray(mask).save(tmp_path / "masks" / cls / "0.tif", exif=exif)
    spec = {"format": "class_folders", "root": str(tmp_path / "images")}
    data = load_hospital(data_cfg({"h": {**spec, "mask_root": str(tmp_path / "masks")}}), "h")
    shown = np.rot90(mask, -1) > 0
    assert (data.masks[0] > 0).tolist() == shown.tolist()
    assert ((data.images[0].mean(axis=2) < 200) == shown).all()


def _turned_image_with_mask(
    root: Path,
    stored: np.ndarray,
    exif: Image.Exif,
    mask: np.ndarray,
    mask_exif: Image.Exif,
    suffix: str,
):
    for c, cls in enumerate(FIVE):
        for folder in ("images", "masks"):
            (root / folder / cls).mkdir(parents=True)
        image = Image.fromarray(stored)
        image.save(root / "images" / cls / f"0{suffix}", exif=own_exif(exif, c), quality=100)
        Image.fromarray(np.ascontiguousarray(mask)).save(
            root / "masks" / cls / "0.png", exif=mask_exif
        )
    spec = {"format": "class_folders", "root": str(root / "images")}
    return load_hospital(data_cfg({"h": {**spec, "mask_root": str(root / "masks")}}), "h")


def test_class_folders_int20_nested_with_map_and_masks(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for cls in ["Neutrophil", "mono"]:
        for i in range(2):
            write_image(images / cls / "patient1" / f"{i}.JPG", 30, 36, seed=i)
            (masks / cls / "patient1").mkdir(parents=True, exist_ok=True)
            Image.fromarray(grey_mask(30, 36)).save(masks / cls / "patient1" / f"{i}.png")
    spec = {
        "format": "class_folders",
        "root": str(images),
        "mask_root": str(masks),
        "class_map": {"mono": "monocyte"},
        "extensions": [".jpg"],
    }
    data = load_hospital(data_cfg({"int20": spec}), "int20")
    assert Counter(data.classes[i] for i in data.labels) == {"neutrophil": 2, "monocyte": 2}
    assert data.masks is not None and all(m.shape == (30, 36) for m in data.masks)


def test_linked_folders_are_read_once_and_under_their_own_path(tmp_path):
    export = tmp_path / "scanner_export"
    for i in range(2):
        write_image(export / f"{i}.png", 20, 20, seed=i)
    images = tmp_path / "images"
    write_image(images / "neutrophil" / "own.png", 20, 20)
    write_image(images / "neutrophil" / "patient3" / "p.png", 20, 20)
    write_image(images / "lymphocyte" / "l.png", 20, 20)
    neutrophil = images / "neutrophil"
    (neutrophil / "batch2").symlink_to(export, target_is_directory=True)
    (neutrophil / "batch2_again").symlink_to(export, target_is_directory=True)
    (neutrophil / "latest").symlink_to("patient3", target_is_directory=True)  # sorts first
    (neutrophil / ".current").symlink_to("patient3", target_is_directory=True)  # hidden
    spec = {"format": "class_folders", "root": str(images)}
    data = load_hospital(data_cfg({"site": spec}), "site")
    labelled = sorted(zip(data.sample_ids, (data.classes[i] for i in data.labels), strict=True))
    assert labelled == [
        ("lymphocyte/l.png", "lymphocyte"),
        ("neutrophil/batch2/0.png", "neutrophil"),
        ("neutrophil/batch2/1.png", "neutrophil"),
        ("neutrophil/own.png", "neutrophil"),
        ("neutrophil/patient3/p.png", "neutrophil"),  # its own path: masks are looked up there
    ]


def test_links_that_cannot_be_followed_and_files_reached_twice_are_reported(tmp_path):
    images = tmp_path / "images"
    write_image(images / "neutrophil" / "n.png", 20, 20)
    write_image(images / "lymphocyte" / "l.png", 20, 20)
    write_image(tmp_path / "export" / "e.png", 20, 20)
    (images / "neutrophil" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (images / "neutrophil" / "batch2").symlink_to(tmp_path / "unmounted" / "share")
    (images / "neutrophil" / "self.png").symlink_to("self.png")
    (images / "monocyte").symlink_to(tmp_path / "unmounted" / "monocyte")
    for cls in ("neutrophil", "lymphocyte"):
        (images / cls / "scan").symlink_to(tmp_path / "export", target_is_directory=True)
    (tmp_path / "export" / "up").symlink_to(images, target_is_directory=True)  # other classes
    write_image(images / "neutrophil" / "p1" / "n1.png", 20, 20)
    (images / "lymphocyte" / "more").symlink_to(images / "neutrophil" / "p1")  # listed first
    # a class folder that is itself a link is as real as a plain one
    write_image(tmp_path / "store" / "eos" / "x.png", 20, 20)
    (images / "eosinophil").symlink_to(tmp_path / "store" / "eos", target_is_directory=True)
    (images / "basophil").mkdir()
    (images / "basophil" / "b").symlink_to(tmp_path / "store" / "eos")  # listed first
    (tmp_path / "store" / "eos" / "back").symlink_to(images)  # up from where it really lies
    spec = {"format": "class_folders", "root": str(images)}
    problems = verify_data(data_cfg({"site": spec}))
    found = {(p.kind, Path(p.path).relative_to(images).as_posix()) for p in problems}
    assert found == {
        ("bad_link", "neutrophil/gone.png"),
        ("bad_link", "neutrophil/batch2"),
        ("bad_link", "neutrophil/self.png"),
        ("bad_link", "monocyte"),
        ("bad_link", "lymphocyte/scan/up"),
        ("bad_link", "neutrophil/scan/up"),
        ("repeated_image", "neutrophil/scan/e.png"),
        ("repeated_image", "lymphocyte/more/n1.png"),  # the real file is kept, the link named
        ("repeated_image", "basophil/b/x.png"),
        ("bad_link", "basophil/b/back"),
        ("bad_link", "eosinophil/back"),
    }
    repeated = {Path(p.path).name: p.detail for p in problems if p.kind == "repeated_image"}
    assert str(images / "lymphocyte" / "scan" / "e.png") in repeated["e.png"]
    assert str(images / "neutrophil" / "p1" / "n1.png") in repeated["n1.png"]


def test_class_names_match_whichever_unicode_form_they_are_written_in(tmp_path):
    composed, decomposed = "\u00e9osinophile", "e\u0301osinophile"
    write_image(tmp_path / "images" / decomposed / "a.png", 20, 20)  # as macOS names it
    spec = {"format": "class_folders", "root": str(tmp_path / "images")}
    data = load_hospital(data_cfg({"site": spec}, classes=["neutrophil", composed]), "site")
    assert [data.classes[i] for i in data.labels] == [composed]
    mapped = {**spec, "class_map": {composed.upper(): "neutrophil"}}
    data = load_hospital(data_cfg({"site": mapped}, classes=["neutrophil"]), "site")
    assert [data.classes[i] for i in data.labels] == ["neutrophil"]


def test_a_hard_link_is_the_same_file_under_another_name(tmp_path):
    images = tmp_path / "images"
    write_image(images / "neutrophil" / "n.png", 20, 20)
    write_image(images / "lymphocyte" / "l.png", 20, 20)
    (images / "lymphocyte" / "scan.png").hardlink_to(images / "neutrophil" / "n.png")
    spec = {"format": "class_folders", "root": str(images)}
    [problem] = verify_data(data_cfg({"site": spec}))
    assert problem.kind == "repeated_image" and problem.path.endswith("neutrophil/n.png")
    assert str(images / "lymphocyte" / "scan.png") in problem.detail


def test_a_copy_of_an_image_is_named_in_its_own_class_and_under_another(tmp_path):
    # Not a link: a download saved twice would be trained and tested as two images, and one
    # filed under two classes trained with two labels.
    images = tmp_path / "images"
    for cls in ("neutrophil", "lymphocyte"):
        for i in range(3):
            write_image(images / cls / f"{i}.png", 20, 20, seed=i)
    shutil.copy(images / "neutrophil" / "0.png", images / "neutrophil" / "copy_of_0.png")
    shutil.copy(images / "neutrophil" / "1.png", images / "lymphocyte" / "n1.png")  # read first
    spec = {"format": "class_folders", "root": str(images)}
    problems = verify_data(data_cfg({"site": spec}))
    assert [(p.kind, Path(p.path).relative_to(images).as_posix(), p.detail) for p in problems] == [
        (
            "conflicting_label",
            "neutrophil/1.png",
            f"a byte-identical copy of {images / 'lymphocyte' / 'n1.png'}, filed as lymphocyte "
            "there and as neutrophil here; keep it under its own class only",
        ),
        (
            "repeated_image",
            "neutrophil/copy_of_0.png",
            f"a byte-identical copy of {images / 'neutrophil' / '0.png'}; delete one of them",
        ),
    ]


def test_an_image_or_mask_of_several_frames_is_refused_naming_their_count(tmp_path):
    # Read as its first frame, a multi-page TIFF's other pages were dropped without a word.
    images, masks = tmp_path / "images" / "neutrophil", tmp_path / "masks" / "neutrophil"
    masks.mkdir(parents=True)
    for i in range(3):
        write_image(images / f"{i}.tif", 20, 20, seed=i)
        Image.fromarray(grey_mask(20, 20)).save(masks / f"{i}.tif")
    for path, count in ((images / "1.tif", 2), (masks / "2.tif", 3)):
        with Image.open(path) as page:
            page.save(path, save_all=True, append_images=[page.copy()] * (count - 1))
    # A camera's JPEG with a preview beside its picture (MPO) is that picture.
    picture = Image.fromarray(np.full((20, 20, 3), 90, np.uint8))
    preview = picture.resize((10, 10))
    picture.save(images / "3.jpg", "MPO", save_all=True, append_images=[preview])
    Image.fromarray(grey_mask(20, 20)).save(masks / "3.tif")
    spec = {"format": "class_folders", "root": str(images.parent), "mask_root": str(masks.parent)}
    problems = verify_data(data_cfg({"site": spec}))
    assert [(p.kind, Path(p.path).relative_to(tmp_path).as_posix()) for p in problems] == [
        ("unreadable_image", "images/neutrophil/1.tif"),
        ("unreadable_mask", "masks/neutrophil/2.tif"),
    ]
    assert "ValueError: 2 frames in one file (a multi-page TIFF?)" in problems[0].detail
    assert "ValueError: 3 frames in one file" in problems[1].detail


def test_a_tiff_with_reduced_resolution_previews_is_read_as_its_picture(tmp_path):
    # A scanner's TIFF: a thumbnail page (NewSubfileType 1) before the picture, a pyramid
    # level after it. Counted as three frames, the picture was refused.
    picture = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3))
    path = tmp_path / "scan.tif"
    with path.open("w+b") as file, TiffImagePlugin.AppendingTiffWriter(file, new=True) as tiff:
        for page, kind in (
            (picture.resize((8, 6)), 1),
            (picture, 0),
            (picture.resize((20, 15)), 1),
        ):
            page.save(tiff, format="TIFF", tiffinfo={254: kind})
            tiff.newFrame()
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(load_checked(image)), np.asarray(picture))
    # Two pictures among the previews are still two frames.
    with path.open("w+b") as file, TiffImagePlugin.AppendingTiffWriter(file, new=True) as tiff:
        for page, kind in ((picture, 0), (picture.resize((8, 6)), 1), (picture, 0)):
            page.save(tiff, format="TIFF", tiffinfo={254: kind})
            tiff.newFrame()
    with Image.open(path) as image, pytest.raises(ValueError, match="^2 frames in one file"):
        load_checked(image)


def test_a_share_that_reports_inode_0_for_every_file_keeps_its_images(tmp_path, monkeypatch):
    images = tmp_path / "images"
    for i in range(3):
        write_image(images / "neutrophil" / f"n{i}.png", 20, 20, seed=i)
    stat = Path.stat

    def inode_zero(path, *args, **kwargs):
        status = stat(path, *args, **kwargs)
        return os.stat_result((status.st_mode, 0, *tuple(status)[2:]))

    monkeypatch.setattr(Path, "stat", inode_zero)
    spec = {"format": "class_folders", "root": str(images)}
    assert verify_data(data_cfg({"site": spec})) == []


def test_a_zxaoyou_image_linked_under_a_second_id_is_reported(tmp_path):
    folder = tmp_path / "Dataset 1"
    for image_id in (1, 2):
        write_image(folder / f"{image_id:03d}.bmp", 20, 20, seed=image_id)
        Image.fromarray(grey_mask(20, 20)).save(folder / f"{image_id:03d}.png")
    for image_id, target in ((900, 1), (901, 2)):
        (folder / f"{image_id}.png").symlink_to(folder / f"{target:03d}.png")
    (folder / "900.bmp").symlink_to(folder / "001.bmp")
    (folder / "901.bmp").hardlink_to(folder / "002.bmp")
    rows = "image ID,class label\n1,1\n2,2\n900,3\n901,4\n"
    (tmp_path / "Class Labels of Dataset 1.csv").write_text(rows, encoding="utf-8")
    spec = {"format": "zxaoyou", "root": str(tmp_path), "subset": "Dataset 1"}
    problems = verify_data(data_cfg({"site": spec}))
    assert {(p.kind, Path(p.path).name) for p in problems} == {
        ("repeated_image", "900.bmp"),  # the symbolic link is named, not the file it points at
        ("repeated_image", "901.bmp"),  # of a hard link's two names, the later id
    }


def _zxaoyou_with_masks(root: Path, masks: dict[int, Image.Image]) -> dict:
    folder = root / "Dataset 1"
    for image_id, mask in masks.items():
        write_image(folder / f"{image_id:03d}.bmp", 20, 20, seed=image_id)
        mask.save(folder / f"{image_id:03d}.png")
    rows = "".join(f"{image_id},1\n" for image_id in masks)
    (root / "Class Labels of Dataset 1.csv").write_text("image ID,class label\n" + rows)
    return {"format": "zxaoyou", "root": str(root), "subset": "Dataset 1"}


def test_a_zxaoyou_folder_of_upper_case_extensions_has_its_masks(tmp_path):
    # Exports from Windows and cameras: 001.BMP was listed, 001.PNG not found as its mask.
    spec = _zxaoyou_with_masks(tmp_path, {i: Image.fromarray(grey_mask(20, 20)) for i in (1, 2)})
    folder = tmp_path / "Dataset 1"
    for path in sorted(folder.iterdir()):
        path.rename(path.with_suffix(path.suffix.upper()))
    assert verify_data(data_cfg({"site": spec})) == []
    data = load_hospital(data_cfg({"site": spec}), "site")
    assert data.masks is not None and all(
        (mask == grey_mask(20, 20) // 100).all() for mask in data.masks
    )
    Image.fromarray(grey_mask(20, 20)).save(folder / "001.png")  # beside 001.PNG
    [problem] = verify_data(data_cfg({"site": spec}))
    assert problem.kind == "ambiguous_mask"


def test_masks_in_colours_class_codes_alpha_or_of_no_cell_are_refused_not_misread(tmp_path):
    grey = grey_mask(20, 20)
    codes = grey // 100  # 0, 1, 2
    colours = np.zeros((20, 20, 3), np.uint8)
    colours[grey == 128] = (0, 255, 0)  # green cytoplasm, red nucleus: alike in grey
    colours[grey == 255] = (255, 0, 0)
    palette = Image.fromarray(codes, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0])  # VOC's first colours
    grey_palette = Image.fromarray(codes, "P")
    grey_palette.putpalette([0, 0, 0, 128, 128, 128, 255, 255, 255])
    # A cell on a transparent white background (an image editor's export): read without its
    # alpha, the background was nucleus.
    see_through = np.dstack([np.where(grey > 0, grey, 255), np.where(grey > 0, 255, 0)])
    masks = {
        1: Image.fromarray(grey),
        2: Image.fromarray(codes),
        3: Image.fromarray((grey > 0).astype(np.uint8)),
        4: Image.fromarray(colours),
        5: palette,
        6: grey_palette,  # a palette of greys is a grey mask
        7: Image.fromarray(np.zeros((20, 20), np.uint8)),  # no cell drawn: all background
        8: Image.fromarray(np.repeat(grey[..., None], 3, axis=2)),  # grey saved as RGB
        9: Image.fromarray(see_through.astype(np.uint8), "LA"),
        10: Image.fromarray(grey).convert("RGBA"),  # an opaque alpha hides nothing
        # A transparent black background (an annotation tool's export) is background as read.
        11: Image.fromarray(np.dstack([grey, np.where(grey > 0, 255, 0)]).astype(np.uint8), "LA"),
    }
    spec = _zxaoyou_with_masks(tmp_path, masks)
    problems = verify_data(data_cfg({"site": spec}))
    assert {(p.kind, Path(p.path).name) for p in problems} == {
        ("bad_mask", "002.png"),
        ("bad_mask", "003.png"),
        ("bad_mask", "004.png"),
        ("bad_mask", "005.png"),
        ("bad_mask", "007.png"),
        ("bad_mask", "009.png"),
    }
    details = {Path(p.path).name: p.detail for p in problems}
    assert "values run 0..2" in details["002.png"] and "colour mask" in details["004.png"]
    assert details["007.png"].startswith("all background: it marks no cell")
    transparent = f"{int((grey == 0).sum())} of its 400 pixels are transparent"
    assert details["009.png"].startswith(transparent)
    assert all("0 background, 128 cytoplasm, 255 nucleus" in d for d in details.values())


def test_a_grey_mask_saved_as_a_colour_jpeg_is_read_as_grey(tmp_path):
    grey = np.repeat(grey_mask(40, 40)[..., None], 3, axis=2)
    folder = tmp_path / "GrTh"
    write_image(folder / "Original" / "Neutrophil" / "0.jpg", 40, 40)
    (folder / "Ground Truth" / "Neutrophil").mkdir(parents=True)
    Image.fromarray(grey).save(folder / "Ground Truth" / "Neutrophil" / "0.jpg", quality=75)
    data = load_hospital(data_cfg({"r": {"format": "raabin", "root": str(tmp_path)}}), "r")
    assert (data.masks[0] == grey_mask(40, 40) // 100).mean() > 0.97


def test_a_folder_that_cannot_be_listed_is_reported_not_skipped(tmp_path, monkeypatch):
    images = tmp_path / "images"
    write_image(images / "neutrophil" / "n.png", 20, 20)
    write_image(images / "neutrophil" / "patient2" / "p.png", 20, 20)
    locked = images / "neutrophil" / "patient2"
    listdir = os.listdir

    def denied_at_locked(path):  # as for a folder of mode 000 (root, who runs CI, reads all)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", denied_at_locked)
    spec = {"format": "class_folders", "root": str(images)}
    problems = verify_data(data_cfg({"site": spec}))
    assert [(p.kind, p.path, p.detail) for p in problems] == [
        ("unreadable_folder", str(locked), "Permission denied")
    ]


def test_one_mask_for_two_images_or_two_masks_for_one_are_reported(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_image(images / "neutrophil" / "1.png", 30, 36)
    write_image(images / "neutrophil" / "1.jpg", 30, 36)  # a second image named 1
    write_image(images / "neutrophil" / "2.png", 30, 36)
    for name in ("1.png", "2.png", "2.bmp"):  # a second mask named 2
        (masks / "neutrophil").mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey_mask(30, 36)).save(masks / "neutrophil" / name)
    spec = {"format": "class_folders", "root": str(images), "mask_root": str(masks)}
    problems = verify_data(data_cfg({"site": spec}))
    assert [(p.kind, Path(p.path).relative_to(tmp_path).as_posix()) for p in problems] == [
        ("ambiguous_mask", "images/neutrophil/1.png"),
        ("ambiguous_mask", "masks/neutrophil/2.png"),
    ]
    assert "1.jpg" in problems[0].detail and "2.bmp" in problems[1].detail


def test_masks_beside_their_images_are_the_other_extensions(tmp_path):
    for i in range(2):
        write_image(tmp_path / "neutrophil" / f"{i}.jpg", 30, 36, seed=i)
        Image.fromarray(grey_mask(30, 36)).save(tmp_path / "neutrophil" / f"{i}.png")
    spec = {
        "format": "class_folders",
        "root": str(tmp_path),
        "mask_root": str(tmp_path),
        "extensions": [".jpg"],
    }
    data = load_hospital(data_cfg({"site": spec}), "site")
    assert data.sample_ids == ["neutrophil/0.jpg", "neutrophil/1.jpg"]
    assert data.masks is not None and all(set(np.unique(m)) == {0, 1, 2} for m in data.masks)


# ---- splits ----


def test_split_indices_stratified_disjoint_covering_deterministic():
    labels = np.repeat(np.arange(5), [100, 30, 20, 5, 3])
    splits = split_indices(labels, seed=7, fractions=[0.6, 0.2, 0.2])
    assert list(splits) == ["train", "val", "test"]
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) and set(joined) == set(range(len(labels)))
    for cls, count in enumerate([100, 30, 20, 5, 3]):
        per_split = [int((labels[idx] == cls).sum()) for idx in splits.values()]
        assert min(per_split) >= 1, "every class with >= 3 images is in every split"
        assert abs(per_split[0] - 0.6 * count) <= 1.5
    assert all(idx.dtype == np.int64 for idx in splits.values())
    again = split_indices(labels, seed=7, fractions=[0.6, 0.2, 0.2])
    assert all(np.array_equal(again[k], splits[k]) for k in splits)
    other = split_indices(labels, seed=8, fractions=[0.6, 0.2, 0.2])
    assert not np.array_equal(other["train"], splits["train"])


def test_split_indices_default_fractions_and_rare_classes():
    labels = np.array([0] * 50 + [1, 2, 2])
    splits = split_indices(labels, seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [32, 11, 10]
    assert 50 in splits["train"], "a single image goes to train"
    with pytest.raises(ValueError, match="three split fractions"):
        split_indices(labels, seed=0, fractions=[0.5, 0.5])


def test_hospital_split_matches_split_indices(real_cfg):
    data = load_hospital(real_cfg, "dataset1")
    expected = split_indices(data.labels, real_cfg.split.seed, real_cfg.split.fractions)
    for split in ("train", "val", "test"):
        part = hospital_split(real_cfg, "dataset1", split)
        assert part.sample_ids == [data.sample_ids[i] for i in expected[split]]
        assert np.array_equal(part.labels, data.labels[expected[split]])
    with pytest.raises(ValueError, match="unknown split"):
        hospital_split(real_cfg, "dataset1", "holdout")


def test_every_image_is_tested_once_over_the_folds_with_the_class_mix_kept():
    labels = np.repeat(np.arange(5), [23, 13, 8, 5, 3])
    folds = [fold_indices(labels, seed=3, folds=5, fold=f) for f in range(5)]
    tested = np.concatenate([f["test"] for f in folds])
    assert sorted(tested) == list(range(len(labels)))
    sizes = [len(f["test"]) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for f, split in enumerate(folds):
        joined = np.concatenate(list(split.values()))
        assert sorted(joined) == list(range(len(labels))), "disjoint and covering"
        assert np.array_equal(split["val"], folds[(f + 1) % 5]["test"])
        # Stratified: a class of 23 has 4 or 5 images in every fold.
        assert 4 <= int((labels[split["test"]] == 0).sum()) <= 5
    again = fold_indices(labels, seed=3, folds=5, fold=2)
    assert all(np.array_equal(again[k], folds[2][k]) for k in again)


def test_every_fold_trains_on_each_class_of_two_images_or_more():
    # Dataset 2's mix: 2 basophils and 1 image of a rarer class still.
    labels = np.repeat(np.arange(5), [19, 15, 10, 2, 1])
    for seed in range(10):
        folds = [fold_indices(labels, seed=seed, folds=5, fold=f) for f in range(5)]
        tested = np.concatenate([f["test"] for f in folds])
        assert sorted(tested) == list(range(len(labels))), "every image still tested once"
        for f, split in enumerate(folds):
            joined = np.concatenate(list(split.values()))
            assert sorted(joined) == list(range(len(labels))), "disjoint and covering"
            assert set(labels[split["train"]]) >= {0, 1, 2, 3}
            assert set(split["val"]) <= set(folds[(f + 1) % 5]["test"])
        # The image of one cannot be helped: two folds test or validate it.
        assert sum(4 not in set(labels[split["train"]]) for split in folds) == 2
    # A hospital of pairs: moving every pair's validation image would leave none to validate.
    for fold in range(5):
        assert len(fold_indices(np.repeat(np.arange(3), 2), seed=0, folds=5, fold=fold)["val"])


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"seed": 0, "fractions": [0.6, 0.2, 0.2], "folds": 2, "fold": 0}, "at least 3 folds"),
        ({"seed": 0, "fractions": [0.6, 0.2, 0.2], "folds": 5, "fold": 5}, "fold must be in 0..4"),
        (
            {"seed": 0, "fractions": [0.5, 0.5], "folds": None, "fold": 0},
            "three non-negative split fractions",
        ),
        (
            {"seed": 0, "fractions": [0.6, 0.2, 0.2], "train_share": 0},
            r"train_share must be in \(0, 1\]",
        ),
        ({"seed": 0, "fractions": [0.6, 0.2, 0.2], "train_share": 1.5}, "got 1.5"),
        ({"seed": -1, "fractions": [0.6, 0.2, 0.2]}, "seed must be a whole number >= 0"),
        ({"seed": 1.7, "fractions": [0.6, 0.2, 0.2]}, "got seed=1.7"),
        ({"seed": 0, "fractions": [0.6, 0.2, 0.2], "folds": 5.9, "fold": 0}, "got folds=5.9"),
        ({"seed": 0, "fractions": [0.6, 0.2, 0.2], "folds": 5, "fold": 4.99}, "got fold=4.99"),
        ({"seed": True, "fractions": [0.6, 0.2, 0.2]}, "got seed=True"),
    ],
)
def test_a_bad_split_is_one_line_naming_data_split(split, message):
    with pytest.raises(JobError, match=f"data.split: .*{message}"):
        check_split(OmegaConf.create({"split": split}))


def test_a_large_split_seed_is_kept_exactly():
    seed = 2**53 + 1  # a float would make it 2**53, another split
    split = {"seed": seed, "fractions": [0.6, 0.2, 0.2], "folds": 5, "fold": 2.0}
    spec = check_split(OmegaConf.create({"split": split}))
    assert (spec.seed, spec.fold) == (seed, 2)


def test_hospital_split_takes_the_configured_fold(real_cfg):
    data = load_hospital(real_cfg, "dataset2")
    cfg = OmegaConf.merge(real_cfg, {"split": {"folds": 5, "fold": 1}})
    expected = fold_indices(data.labels, real_cfg.split.seed, 5, 1)
    for split in ("train", "val", "test"):
        part = hospital_split(cfg, "dataset2", split)
        assert part.sample_ids == [data.sample_ids[i] for i in expected[split]]
    tested = [
        hospital_split(OmegaConf.merge(cfg, {"split": {"fold": f}}), "dataset2", "test")
        for f in range(5)
    ]
    assert sorted(i for part in tested for i in part.sample_ids) == sorted(data.sample_ids)


def test_a_train_share_is_a_nested_stratified_subset_and_leaves_val_and_test_whole():
    labels = np.repeat(np.arange(5), [40, 30, 20, 5, 2])
    whole = fold_indices(labels, seed=0, folds=5, fold=1)
    parts = {
        share: SplitSpec(seed=0, folds=5, fold=1, train_share=share).indices(labels)
        for share in (1.0, 0.5, 0.25)
    }
    assert all(np.array_equal(parts[1.0][k], whole[k]) for k in whole)
    for share in (0.5, 0.25):
        for split in ("val", "test"):
            assert np.array_equal(parts[share][split], whole[split])
        kept = parts[share]["train"]
        assert set(kept) <= set(whole["train"])
        counts = np.bincount(labels[kept], minlength=5)
        full = np.bincount(labels[whole["train"]], minlength=5)
        assert (counts >= 1).all(), "every class keeps at least one training image"
        assert np.array_equal(counts, np.maximum(1, np.round(share * full)))
    assert set(parts[0.25]["train"]) <= set(parts[0.5]["train"]), "nested: a curve, not resamples"


def test_hospital_split_takes_the_configured_train_share(real_cfg):
    cfg = OmegaConf.merge(real_cfg, {"split": {"folds": 5, "fold": 0}})
    half = OmegaConf.merge(cfg, {"split": {"train_share": 0.5}})
    train, kept = (hospital_split(c, "dataset1", "train") for c in (cfg, half))
    assert set(kept.sample_ids) < set(train.sample_ids)
    assert abs(len(kept.sample_ids) - len(train.sample_ids) / 2) <= 5
    assert (
        hospital_split(half, "dataset1", "test").sample_ids
        == hospital_split(cfg, "dataset1", "test").sample_ids
    )


# ---- tensors ----


def test_split_tensors_shapes_values_and_cache():
    cfg = data_cfg(
        {"h": {"format": "synthetic", "domain": "b", "num_images": 30, "image_size": 48, "seed": 5}}
    )
    train = split_tensors(cfg, "h", "train", 32)
    assert train.images.shape == (len(train), 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels.shape == (len(train),)
    assert train.masks is not None and train.masks.shape == (len(train), 32, 32)
    assert train.masks.dtype == torch.uint8
    assert set(train.masks.unique().tolist()) == {0, 1, 2}
    assert split_tensors(cfg, "h", "train", 32) is train
    sizes = [len(split_tensors(cfg, "h", split, 32)) for split in ("train", "val", "test")]
    assert sum(sizes) == 30


def test_split_tensors_mixed_sizes_real(real_cfg):
    # Dataset 1 mixes 120x120, 112x116, ... crops: all come out square.
    test = split_tensors(real_cfg, "dataset1", "test", 64)
    assert test.images.shape[1:] == (3, 64, 64) and test.masks.shape[1:] == (64, 64)
    assert set(test.masks.unique().tolist()) <= {0, 1, 2}


def test_split_digest_follows_the_images_not_the_folder_they_lie_in(tmp_path):
    for cls in FIVE:
        for i in range(4):
            write_image(tmp_path / "a" / cls / f"{i}.png", 20, 24, seed=i)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    (tmp_path / "c" / "lymphocyte" / "2.png").unlink()

    def digest(folder: str, seed: int = 0) -> int:
        hospital = {"h": {"format": "class_folders", "root": str(tmp_path / folder)}}
        return split_digest(data_cfg(hospital, seed=seed), "h")

    assert digest("a") == digest("b") and 0 <= digest("a") < 2**48
    assert digest("c") != digest("a")  # one image fewer redraws the split
    assert digest("a", seed=1) != digest("a")
    # a name that is not UTF-8 (an old Windows share) is hashed as the bytes on disk
    shutil.copytree(tmp_path / "a", tmp_path / "d")
    latin1 = os.fsdecode(bytes(tmp_path / "d" / "lymphocyte") + b"/caf\xe9.png")
    os.rename(tmp_path / "d" / "lymphocyte" / "1.png", latin1)
    assert digest("d") not in (digest("a"), digest("c"))


def test_split_tensors_without_masks(tmp_path):
    for cls in FIVE:
        for i in range(3):
            write_image(tmp_path / cls / f"{i}.png", 20, 24, seed=i)
    cfg = data_cfg({"h": {"format": "class_folders", "root": str(tmp_path)}})
    val = split_tensors(cfg, "h", "val", 16)
    assert val.masks is None and val.images.shape == (5, 3, 16, 16)


def test_load_unknown_hospital_raises_with_report():
    with pytest.raises(DataVerificationError, match="no hospital of this name"):
        load_hospital(data_cfg({}), "nowhere")
