"""Image operations shared by the networks, the pseudo-mask methods and the baselines.

Resizing native-size images and label maps to the square inputs the networks take; Otsu's
threshold; connected components, hole filling and distances on boolean masks, from
scipy.ndimage (exact, and 60-160 times faster than the torch versions they replaced).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.TiffImagePlugin import BITSPERSAMPLE, PLANAR_CONFIGURATION
from scipy import ndimage
from torchvision.transforms.v2 import functional as tvf

# scipy's structuring element for 8-connectivity (diagonal neighbours join a component).
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# Pillow's 16-bit grey modes: its ``convert`` clips them at 255 instead of scaling them.
SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# The bits per pixel that cameras store in 16-bit files, narrowest first.
CAMERA_BIT_DEPTHS = (8, 10, 12, 14, 16)
# EXIF's orientation tag; 1 is upright. Each other value's turn, as Pillow's exif_transpose.
EXIF_ORIENTATION = 0x0112
ORIENTATION_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def eight_bit(image: Image.Image) -> Image.Image:
    """``image`` with values in 0..255, so that ``convert`` keeps what it shows.

    Pillow's ``convert`` clips wider grey values at 255: a 16-bit microscope image came out
    nearly white and trained as such. A 16-bit file (or one Pillow opens as 32-bit integers,
    up to 65535) rarely holds 16 bits: a 12-bit camera's values stop at 4095, which scaled
    from 0..65535 came out nearly black. Its values are scaled from the narrowest of 8, 10,
    12, 14 or 16 bits that holds its brightest pixel onto 0..255, so values that fit 0..255
    (a mask saved as 16-bit) are kept. Float values within 0..1 are scaled onto 0..255. Other
    pixels have no known range and are refused, naming their values.
    """
    if image.mode not in SIXTEEN_BIT_GREY and image.mode not in ("I", "F"):
        return image
    values = np.asarray(image)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L")
    if image.mode == "F" and low >= 0 and high <= 255:
        return Image.fromarray(values.astype(np.uint8), "L")
    if image.mode != "F" and low >= 0 and high <= 65535:
        top = next(2**bits - 1 for bits in CAMERA_BIT_DEPTHS if high <= 2**bits - 1)
        scaled = (values.astype(np.uint32) * 255 + top // 2) // top
        return Image.fromarray(scaled.astype(np.uint8), "L")
    kind = "floating-point" if image.mode == "F" else "32-bit integer"
    raise ValueError(
        f"{kind} pixels from {low:g} to {high:g} have no known range to scale to 8 bits; "
        "save the image with 8 or 16 bits per channel"
    )


# Pillow's raw modes of 16-bit samples.
WIDE_SAMPLES = (";16B", ";16L", ";16N")
# A TIFF's PlanarConfiguration tag's value for one plane per colour.
SEPARATE_PLANES = 2
# A TIFF page's NewSubfileType tag, and its bit for a reduced-resolution copy of another page.
NEW_SUBFILE_TYPE = 254
REDUCED_RESOLUTION = 1


def open_from_memory(source: Path | bytes) -> Image.Image:
    """A file opened from its bytes (read from ``source``, or given), not from the file itself.

    Pillow maps an uncompressed TIFF's file and, turning it by its EXIF orientation as it loads
    it, scrambled the pixels of grey, palette and RGBA files; read from memory they come out
    turned right.
    """
    return Image.open(io.BytesIO(source if isinstance(source, bytes) else source.read_bytes()))


def picture_frames(image: Image.Image) -> list[int]:
    """The frames of ``image`` that are pictures of their own, not previews of another.

    A camera's JPEG with previews beside its picture (MPO) is that picture, its first frame. A
    scanner's TIFF may carry reduced-resolution pages (thumbnails, pyramid levels) beside its
    picture, before or after it; only their NewSubfileType tag tells them apart.
    """
    if image.format == "MPO":
        return [0]
    frames = list(range(getattr(image, "n_frames", 1)))
    if image.format != "TIFF" or len(frames) == 1:
        return frames
    full = []
    for index in frames:
        image.seek(index)
        if not int(image.tag_v2.get(NEW_SUBFILE_TYPE, 0)) & REDUCED_RESOLUTION:
            full.append(index)
    image.seek(0)
    return full or frames


def load_checked(image: Image.Image) -> Image.Image:
    """Decode ``image`` (opened, not loaded), refusing a file Pillow would read wrongly.

    A file of several pictures (a multi-page TIFF, an animated PNG) would be read as its first,
    the others dropped without a word: refused naming their count. One picture with previews
    (:func:`picture_frames`) is read as that picture.

    Pillow decodes 16 bits per colour channel (48-bit PNG and TIFF) to the top 8 bits of each
    value. That is right for values that use 16 bits, but a 12-bit colour camera's 0..4095
    keep 0..15 of 255 and the image trains nearly black. The low bits cannot be had through
    Pillow, so a file whose brightest value fits 14 bits (what :func:`eight_bit` would scale up
    were it grey) is refused by name; one of 8-bit values in 16-bit samples reads all black.
    A TIFF of 16-bit colours in separate planes Pillow reads as 8-bit samples, the pixels
    scrambled: refused.
    """
    pictures = picture_frames(image)
    if len(pictures) > 1:
        raise ValueError(
            f"{len(pictures)} frames in one file (a multi-page TIFF?); only the first would be "
            "read: save each image in a file of its own"
        )
    image.seek(pictures[0])
    raw_modes = [
        tile.args if isinstance(tile.args, str) else str(tile.args[0] if tile.args else "")
        for tile in image.tile
    ]
    colour = image.mode in ("RGB", "RGBA")
    # 16 bits per sample, big- or little-endian or native (a 5-6-5 BMP is "BGR;16": 8 bits).
    wide = colour and any(raw.endswith(WIDE_SAMPLES) for raw in raw_modes)
    bits = tiff_bits_per_sample(image)
    if colour and bits > 8 and not wide:
        separate = image.tag_v2.get(PLANAR_CONFIGURATION) == SEPARATE_PLANES
        layout = "in separate colour planes" if separate else "in a layout"
        raise ValueError(
            f"{bits} bits per colour channel {layout} that Pillow reads as 8 bits, which "
            "scrambles the pixels; save it with interleaved colours or 8 bits per channel"
        )
    image.load()
    if not wide:
        return image
    brightest = int(np.asarray(image)[..., :3].max(initial=0))  # an opaque alpha is 255
    if brightest < 2 ** (14 - 8):
        effect = "all black" if brightest == 0 else "at least 4 times too dark"
        raise ValueError(
            f"16 bits per colour channel, all values below {256 * (brightest + 1)} (a camera "
            f"of 14 bits or fewer): Pillow keeps the top 8 bits of each, so it would read "
            f"{effect}; save it with 8 bits per channel"
        )
    return image


def tiff_bits_per_sample(image: Image.Image) -> int:
    """The widest sample a TIFF declares (its BitsPerSample tag); 8 for any other file."""
    if image.format != "TIFF":
        return 8
    declared = image.tag_v2.get(BITSPERSAMPLE, 8)
    return int(max(declared) if isinstance(declared, tuple) else declared)


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says, as viewers and ``cv2.imread`` show it.

    A camera held sideways stores its pixels unturned and the turn in a tag; masks made from
    the stored order would not lie on the image everyone sees.
    """
    return turned(image, exif_orientation(image))


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of ``image``: 1 (upright) when it has none."""
    return int(image.getexif().get(EXIF_ORIENTATION) or 1)


def turned(image: Image.Image, orientation: int) -> Image.Image:
    """``image`` turned as the EXIF orientation ``orientation`` says (1: as it is, not copied)."""
    method = ORIENTATION_TURNS.get(orientation)
    return image if method is None else image.transpose(method)


def _writable(array: np.ndarray) -> np.ndarray:
    """A C-contiguous writable view or copy: torch warns on the read-only cached data arrays."""
    return np.require(array, requirements=["C", "W"])


def resize_images(images: Sequence[np.ndarray], side: int) -> torch.Tensor:
    """HxWx3 uint8 images of any sizes -> (B, 3, side, side) uint8, antialiased bilinear.

    The aspect ratio is not kept, as in training (single-cell crops are near-square).
    """
    return torch.stack(
        [
            tvf.resize(
                torch.from_numpy(_writable(image)).permute(2, 0, 1),
                [side, side],
                antialias=True,
            )
            for image in images
        ]
    )


def resize_labels(labels: Sequence[np.ndarray], side: int) -> torch.Tensor:
    """HxW uint8 label maps -> (B, side, side) uint8, nearest neighbour so no label is invented."""
    nearest = tvf.InterpolationMode.NEAREST_EXACT
    return torch.stack(
        [
            tvf.resize(
                torch.from_numpy(_writable(label))[None],
                [side, side],
                interpolation=nearest,
            )[0]
            for label in labels
        ]
    )


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the histogram cut that maximises the between-class variance.

    Returns the left edge of the first bin of the upper class, so ``values >= t`` is that class;
    ``inf`` for values all alike, which hold no upper class (a blank image has no stained cell).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return float("inf")
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_below = np.cumsum(counts)[:-1]
    weight_above = values.size - weight_below
    sum_below = np.cumsum(counts * centres)[:-1]
    mean_below = sum_below / np.maximum(weight_below, 1)
    mean_above = (np.sum(counts * centres) - sum_below) / np.maximum(weight_above, 1)
    between = weight_below * weight_above * (mean_below - mean_above) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def connected_components(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a boolean HxW mask: 0 outside, 1..n inside (int64)."""
    labels, _ = ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT_CONNECTED)
    return torch.from_numpy(labels.astype(np.int64))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Add to a mask every background region that does not touch the image border.

    The background is taken 4-connected, the complement of the 8-connected foreground, so a
    hole closed only diagonally stays a hole.
    """
    return ndimage.binary_fill_holes(mask)


def distance_to(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Euclidean distance (float32) of every pixel to the nearest pixel of ``mask``; 0 inside."""
    outside = ~np.asarray(mask, dtype=bool)
    return torch.from_numpy(ndimage.distance_transform_edt(outside).astype(np.float32))


def blob_nearest_centre(mask: np.ndarray) -> np.ndarray:
    """The connected component of ``mask`` holding the pixel nearest the image centre."""
    if not mask.any():
        return mask.copy()
    labels = connected_components(mask).numpy()
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    distance = (ys - (height - 1) / 2) ** 2 + (xs - (width - 1) / 2) ** 2
    nearest = int(np.argmin(distance))
    return labels == labels[ys[nearest], xs[nearest]]


def dilated(mask: np.ndarray | torch.Tensor, kernel: int) -> torch.Tensor:
    """Boolean mask dilated by a square ``kernel`` (odd); outside the image counts as empty."""
    grown = ndimage.maximum_filter(np.asarray(mask, dtype=bool), size=kernel, mode="constant")
    return torch.from_numpy(grown)


def eroded(mask: np.ndarray | torch.Tensor, kernel: int) -> torch.Tensor:
    """Boolean mask eroded by a square ``kernel`` (odd); outside the image counts as inside."""
    kept = ndimage.minimum_filter(
        np.asarray(mask, dtype=bool), size=kernel, mode="constant", cval=1
    )
    return torch.from_numpy(kept)


def opened(mask: np.ndarray | torch.Tensor, kernel: int) -> torch.Tensor:
    """Morphological opening with a square ``kernel`` (odd): removes bridges thinner than it."""
    return dilated(eroded(mask, kernel), kernel)


def channel_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Index of the largest of (K, H, W) scores per pixel, the first of equal ones.

    ``max(0).indices`` gives what ``argmax(0)`` gives, several times faster on CPU, where
    torch reduces over a leading dimension slowly.
    """
    return scores.max(0).indices
