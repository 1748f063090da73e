"""Files the jobs write at the hospital: PNG label maps, colour overlays, a stage figure.

Label maps are single-channel PNGs holding the label itself (0 background, k = class k - 1 + 1,
255 uncertain), so any image library reads them back exactly; overlays are for people.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.data import id_bytes
from common.files import replaced_atomically
from common.imaging import eight_bit, upright

# Background is never painted; class k uses PALETTE[(k - 1) % len(PALETTE)].
PALETTE = np.array(
    [
        (230, 25, 75),  # neutrophil: red
        (60, 180, 75),  # lymphocyte: green
        (0, 130, 200),  # monocyte: blue
        (245, 130, 48),  # eosinophil: orange
        (145, 30, 180),  # basophil: purple
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (0, 128, 128),
        (170, 110, 40),
    ],
    dtype=np.float64,
)
UNCERTAIN_COLOUR = np.array((128, 128, 128), dtype=np.float64)


def class_colours(classes: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Each class's colour in the overlays, in the order of ``classes`` (label k = class k - 1)."""
    return {
        name: tuple(int(c) for c in PALETTE[index % len(PALETTE)])
        for index, name in enumerate(classes)
    }


# zlib level of the PNGs written per image: hundreds per hospital, and level 1 writes them
# several times faster than the default 6 at a few percent more bytes.
PNG_LEVEL = 1
# Pixels per strip of overlay() and rgb_array(): the float64 work of an overlay strip stays
# near 2**18 * 3 * 8 bytes (6 MB) a copy, whatever the image's size.
OVERLAY_STRIP_PIXELS = 1 << 18
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sample_stems(sample_ids: Sequence[str]) -> list[str]:
    """File-name-safe stems of a split's sample ids, all different.

    ``Dataset 1/001.bmp`` -> ``Dataset_1__001``: folder separators become ``__``; the
    extension and unsafe characters go, so two ids can read alike (``a.jpg`` and ``a.png``,
    ``a b`` and ``a_b``). Those each get a short hash of the whole id, so no image's file
    replaces another's; read a split's files back by the stems of the whole split.
    """
    readable = [_readable_stem(sample_id) for sample_id in sample_ids]
    counts = Counter(readable)
    return [
        stem
        if counts[stem] == 1
        else f"{stem}-{hashlib.sha256(id_bytes(sample_id)).hexdigest()[:8]}"
        for stem, sample_id in zip(readable, sample_ids, strict=True)
    ]


def _readable_stem(sample_id: str) -> str:
    without_suffix = str(Path(sample_id).with_suffix("")) if Path(sample_id).suffix else sample_id
    parts = [_UNSAFE.sub("_", part) for part in Path(without_suffix).parts]
    return "__".join(part for part in parts if part) or "sample"


def save_png(path: Path, picture: Image.Image) -> None:
    """Write a PNG through a temporary file beside it, so a failed write leaves no half file."""
    with replaced_atomically(path) as temporary:
        picture.save(temporary, format="PNG", compress_level=PNG_LEVEL)


def save_label_png(path: Path, labels: np.ndarray) -> None:
    """Write an HxW label map as an 8-bit greyscale PNG holding the labels themselves."""
    save_png(path, Image.fromarray(np.asarray(labels, dtype=np.uint8), mode="L"))


def read_label_png(path: Path) -> np.ndarray:
    """Read a label map written by :func:`save_label_png`."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.uint8)


def rgb_array(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as a writable HxWx3 uint8 RGB array, copied a strip at a time.

    ``np.asarray(image)`` goes through ``tobytes()``, which holds the pixels twice more while
    it joins them; strips keep a large image's conversion to the array itself. The array is
    the image as viewers show it (:func:`common.imaging.upright`), as in training.
    """
    image = upright(image)
    if image.mode != "RGB":
        image = eight_bit(image).convert("RGB")
    width, height = image.size
    out = np.empty((height, width, 3), dtype=np.uint8)
    step = max(1, OVERLAY_STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        bottom = min(top + step, height)
        out[top:bottom] = np.asarray(image.crop((0, top, width, bottom)), dtype=np.uint8)
    return out


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label (a one-pixel outline)."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    return edge


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Tint each labelled pixel with its class colour and outline the regions.

    Computed a strip of rows at a time (:func:`overlay_strips`), so the float work takes a few
    MB whatever the image's size.

    Parameters
    ----------
    image
        HxWx3 uint8 RGB.
    labels
        HxW label map of the same size (0 background, 255 uncertain, shown grey).
    alpha
        Opacity of the tint.

    Returns
    -------
    numpy.ndarray
        HxWx3 uint8 RGB.
    """
    out = np.empty(image.shape, dtype=np.uint8)
    for top, strip in overlay_strips(image, labels, alpha):
        out[top : top + len(strip)] = strip
    return out


def overlay_strips(
    image: np.ndarray, labels: np.ndarray, alpha: float = 0.4
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`overlay` as ``(first row, rows x W x 3 uint8)`` strips from the top.

    Each strip sees the row below it, so the outline is the one of the whole image.
    """
    labels = np.asarray(labels)
    height, width = labels.shape
    step = max(1, OVERLAY_STRIP_PIXELS // max(1, width))
    for top in range(0, height, step):
        bottom = min(top + step, height)
        strip = labels[top : bottom + 1]  # one more row for the outline, where there is one
        edge = _boundary(strip)[: bottom - top]
        yield top, _tint(image[top:bottom], strip[: bottom - top], edge, alpha)


def _tint(image: np.ndarray, labels: np.ndarray, edge: np.ndarray, alpha: float) -> np.ndarray:
    """:func:`overlay` of one strip, given its outline pixels."""
    out = image.astype(np.float64)
    colours = PALETTE[(labels.astype(np.int64) - 1) % len(PALETTE)]
    colours[labels == 255] = UNCERTAIN_COLOUR
    painted = labels > 0
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    edge = edge & painted
    out[edge] = colours[edge]
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay(path: Path, image: np.ndarray, labels: np.ndarray) -> None:
    """Write :func:`overlay` of an image and its label map as a PNG.

    The strips are pasted straight into the PNG's picture: no full-size array besides it.
    """
    picture = Image.new("RGB", (image.shape[1], image.shape[0]))
    for top, strip in overlay_strips(image, labels):
        picture.paste(Image.fromarray(strip), (0, top))
    save_png(path, picture)


# The legend under a figure: a coloured square and the class name per entry, lines of this height.
LEGEND_SWATCH, LEGEND_LINE = 10, 16


def _legend_places(names: Sequence[str], width: int) -> list[tuple[int, int]]:
    """(x, line) of each legend entry, wrapped to lines ``width`` px wide."""
    font = ImageFont.load_default()
    places, x, line = [], 3, 0
    for name in names:
        entry = LEGEND_SWATCH + 4 + int(font.getlength(name)) + 12
        if x + entry > width and x > 3:
            x, line = 3, line + 1
        places.append((x, line))
        x += entry
    return places


def heatmap(image: np.ndarray, values: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a [0, 1] map over an image in a blue-to-red ramp, for looking at raw maps."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1)[..., None]
    ramp = v * np.array((255.0, 40.0, 0.0)) + (1 - v) * np.array((0.0, 40.0, 255.0))
    out = (1 - alpha) * image.astype(np.float64) + alpha * ramp
    return np.clip(out, 0, 255).astype(np.uint8)


def save_grid(
    path: Path,
    rows: Sequence[Sequence[np.ndarray]],
    titles: Sequence[str],
    tile: int = 128,
    legend: dict[str, tuple[int, int, int]] | None = None,
) -> None:
    """Write a grid of RGB tiles (each resized to ``tile`` px) under a row of column titles.

    ``legend`` (name -> colour, :func:`class_colours`) adds a line of coloured squares and
    names under the grid, so that the overlays can be read without the code.
    """
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one tile")
    gap, header = 2, 16
    columns = max(len(row) for row in rows)
    width = columns * (tile + gap) - gap
    legend = legend or {}
    places = _legend_places(list(legend), width)
    footer = 4 + (places[-1][1] + 1) * LEGEND_LINE if places else 0
    height = header + len(rows) * (tile + gap) - gap + footer
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((c * (tile + gap) + 3, 2), title, fill=(0, 0, 0), font=font)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            resized = Image.fromarray(picture).resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(resized, (c * (tile + gap), header + r * (tile + gap)))
    for (name, colour), (x, line) in zip(legend.items(), places, strict=True):
        y = height - footer + 4 + line * LEGEND_LINE
        draw.rectangle((x, y, x + LEGEND_SWATCH, y + LEGEND_SWATCH), fill=colour)
        draw.text((x + LEGEND_SWATCH + 4, y), name, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
