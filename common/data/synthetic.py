"""Synthetic blood-smear hospitals: the embedded default data and the test bed.

Each image is a single-cell crop: one white cell near the centre, red-cell distractors around it,
on plasma-coloured background. The five cell types differ the way a haematologist tells them apart
(nucleus shape, cell size, cytoplasm colour and granules), and each hospital preset ("domain") has
its own stain palette, magnification, blur, noise, illumination and class mix, so that federated
training across presets faces a real domain shift. Masks are exact: they come from the same
signed-distance shapes that paint the cell. Everything is numpy, vectorised per image, and fixed by
the seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist

import numpy as np

from common.data.splits import apportion
from common.data.types import BACKGROUND, CYTOPLASM, NUCLEUS

CELL_TYPES = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")

RGB = tuple[float, float, float]
ShapeFn = Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Domain:
    """Imaging conditions of one synthetic hospital (microscope, camera, stain, patient mix)."""

    hue_deg: float
    stain_strength: float
    magnification: float
    blur_sigma: float
    noise_std: float
    illumination: float
    vignette: float
    background: RGB
    red_cells: tuple[int, int]
    class_mix: tuple[float, float, float, float, float]


DOMAINS: dict[str, Domain] = {
    # Like zxaoyou Dataset 1: yellow background, big blurry cells, few red cells, neutrophil-heavy.
    "a": Domain(
        hue_deg=12.0,
        stain_strength=1.0,
        magnification=1.12,
        blur_sigma=1.1,
        noise_std=0.012,
        illumination=0.05,
        vignette=0.0,
        background=(0.96, 0.93, 0.68),
        red_cells=(0, 2),
        class_mix=(0.50, 0.18, 0.14, 0.10, 0.08),
    ),
    # Like CellaVision (Dataset 2): sharp, beige background, smaller cells among many red cells.
    "b": Domain(
        hue_deg=0.0,
        stain_strength=1.1,
        magnification=0.82,
        blur_sigma=0.35,
        noise_std=0.02,
        illumination=0.10,
        vignette=0.0,
        background=(0.97, 0.89, 0.83),
        red_cells=(2, 7),
        class_mix=(0.32, 0.30, 0.16, 0.12, 0.10),
    ),
    # A third scanner: bluish stain, grey background, noisy, uneven light, balanced classes.
    "c": Domain(
        hue_deg=-28.0,
        stain_strength=0.85,
        magnification=0.97,
        blur_sigma=0.7,
        noise_std=0.035,
        illumination=0.18,
        vignette=0.12,
        background=(0.87, 0.88, 0.92),
        red_cells=(0, 4),
        class_mix=(0.22, 0.20, 0.20, 0.19, 0.19),
    ),
}


@dataclass(frozen=True)
class CellType:
    """How one white-cell type looks: relative size, colours, granules and outline."""

    size: float
    cytoplasm: RGB
    nucleus: RGB
    granule: RGB
    granule_cover: float
    coarse_granules: bool
    granules_over_nucleus: bool
    wobble: float
    vacuoles: bool = False


# Wright-Giemsa-like colours before the domain's hue rotation.
CELLS: dict[str, CellType] = {
    "neutrophil": CellType(
        size=1.0,
        cytoplasm=(0.88, 0.76, 0.84),
        nucleus=(0.36, 0.17, 0.46),
        granule=(0.78, 0.62, 0.78),
        granule_cover=0.35,
        coarse_granules=False,
        granules_over_nucleus=False,
        wobble=0.03,
    ),
    "lymphocyte": CellType(
        size=0.68,
        cytoplasm=(0.64, 0.77, 0.95),
        nucleus=(0.26, 0.12, 0.40),
        granule=(0.64, 0.77, 0.95),
        granule_cover=0.0,
        coarse_granules=False,
        granules_over_nucleus=False,
        wobble=0.025,
    ),
    "monocyte": CellType(
        size=1.2,
        cytoplasm=(0.70, 0.72, 0.84),
        nucleus=(0.44, 0.28, 0.56),
        granule=(0.70, 0.72, 0.84),
        granule_cover=0.0,
        coarse_granules=False,
        granules_over_nucleus=False,
        wobble=0.06,
        vacuoles=True,
    ),
    "eosinophil": CellType(
        size=1.05,
        cytoplasm=(0.96, 0.74, 0.58),
        nucleus=(0.34, 0.16, 0.42),
        granule=(0.90, 0.38, 0.22),
        granule_cover=0.45,
        coarse_granules=True,
        granules_over_nucleus=False,
        wobble=0.03,
    ),
    "basophil": CellType(
        size=0.92,
        cytoplasm=(0.74, 0.62, 0.82),
        nucleus=(0.30, 0.14, 0.40),
        granule=(0.20, 0.06, 0.30),
        granule_cover=0.6,
        coarse_granules=True,
        granules_over_nucleus=True,
        wobble=0.04,
    ),
}

RED_CELL: RGB = (0.90, 0.55, 0.58)
# Neutrophil radius as a share of the crop at magnification 1.
BASE_RADIUS = 0.3


def generate_hospital(
    domain: str, num_images: int, image_size: int, seed: int, classes: Sequence[str]
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Generate one synthetic hospital's images, labels and exact masks.

    Parameters
    ----------
    domain
        Imaging preset, a key of :data:`DOMAINS` (``"a"``, ``"b"`` or ``"c"``).
    num_images
        Number of single-cell crops.
    image_size
        Side of the square crops in pixels (at least 32).
    seed
        Seed; the same arguments always give identical arrays.
    classes
        The class vocabulary; it must contain the five :data:`CELL_TYPES`, and labels index it.

    Returns
    -------
    images : list[numpy.ndarray]
        HxWx3 uint8 RGB crops.
    labels : numpy.ndarray
        ``(N,)`` int64 indices into ``classes``.
    masks : list[numpy.ndarray]
        HxW uint8 masks: BACKGROUND (red cells included), CYTOPLASM, NUCLEUS.
    """
    check_parameters(domain, num_images, image_size)
    cell_types = _cell_types(domain, num_images, seed)
    labels = _vocabulary_indices(classes)[cell_types]
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    spec = DOMAINS[domain]
    images, masks = [], []
    for cell_type in cell_types:
        image, mask = _render(rng, spec, CELL_TYPES[cell_type], image_size)
        images.append(image)
        masks.append(mask)
    return images, labels, masks


def synthetic_labels(
    domain: str, num_images: int, image_size: int, seed: int, classes: Sequence[str]
) -> np.ndarray:
    """Return the labels :func:`generate_hospital` would give, without rendering any image.

    Verification uses it to count classes and check the parameters at no rendering cost.

    Parameters
    ----------
    domain, num_images, image_size, seed, classes
        As for :func:`generate_hospital`.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` int64 indices into ``classes``.
    """
    check_parameters(domain, num_images, image_size)
    return _vocabulary_indices(classes)[_cell_types(domain, num_images, seed)]


def check_parameters(domain: str, num_images: int, image_size: int) -> None:
    """Reject parameters the generator cannot honour, before any work is done.

    Parameters
    ----------
    domain, num_images, image_size
        As for :func:`generate_hospital`.

    Raises
    ------
    ValueError
        Naming the offending parameter.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; expected one of {sorted(DOMAINS)}")
    if num_images < 1:
        raise ValueError(f"synthetic num_images must be positive, got {num_images}")
    if image_size < 32:
        raise ValueError(f"synthetic image_size must be at least 32 pixels, got {image_size}")


def _cell_types(domain: str, num_images: int, seed: int) -> np.ndarray:
    """Draw the cell type of every image: the domain's exact class mix, shuffled by the seed."""
    counts = apportion(num_images, DOMAINS[domain].class_mix, minimum=1)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[0])
    return rng.permutation(np.repeat(np.arange(len(CELL_TYPES)), counts))


def _vocabulary_indices(classes: Sequence[str]) -> np.ndarray:
    """Map each of :data:`CELL_TYPES` to its index in the configured vocabulary."""
    names = list(classes)
    missing = [name for name in CELL_TYPES if name not in names]
    if missing:
        raise ValueError(
            f"synthetic hospitals need the classes {list(CELL_TYPES)} in data.classes; "
            f"missing {missing} from {names}"
        )
    return np.array([names.index(name) for name in CELL_TYPES], dtype=np.int64)


def _render(
    rng: np.random.Generator, domain: Domain, cell_name: str, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one crop (background, red cells, then the white cell on top) and its mask."""
    cell = CELLS[cell_name]
    unit = BASE_RADIUS * size * domain.magnification
    radius = min(unit * cell.size * rng.uniform(0.92, 1.08), 0.42 * size)
    centre = size / 2 + rng.uniform(-0.04, 0.04, 2) * size
    grid = _pixel_centres(size)
    # Texture scales follow the magnification: plasma mottling, fine and coarse granules, chromatin.
    mottling, fine, coarse, chromatin = _noise_fields(
        rng, size, (size / 12, 0.5 * unit / 36, 1.1 * unit / 36, 2.5 * unit / 36)
    )
    image = np.empty((size, size, 3), np.float32)
    image[:] = domain.background
    image *= 1.0 + 0.025 * mottling[..., None]
    rotate = _hue_rotation(domain.hue_deg, domain.stain_strength)
    _paint_red_cells(rng, image, domain, rotate, unit, centre, radius)
    textures = {
        "fine": fine,
        "granules": coarse if cell.coarse_granules else fine,
        "chromatin": chromatin,
    }
    mask = _paint_white_cell(rng, image, grid, cell_name, rotate, textures, centre, radius)
    image = _apply_optics(rng, image, domain)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


def _paint_red_cells(
    rng: np.random.Generator,
    image: np.ndarray,
    domain: Domain,
    rotate: Callable[[RGB], np.ndarray],
    unit: float,
    centre: np.ndarray,
    wbc_radius: float,
) -> None:
    """Paint pale-centred pink discs around the white cell, some cut by the border, in place."""
    size = image.shape[0]
    count = int(rng.integers(domain.red_cells[0], domain.red_cells[1] + 1))
    radii = unit * 0.62 * rng.uniform(0.88, 1.1, 8 * count)
    spots = rng.uniform(-0.3, 1.3, (8 * count, 2)) * size
    # Red cells may touch or tuck under the white cell, never sit on its centre.
    far = _length(*(spots - centre).T) > wbc_radius + 0.25 * radii
    colour, pallor = rotate(RED_CELL), rotate((0.97, 0.82, 0.82))
    for (cy, cx), r in list(zip(spots[far].tolist(), radii[far].tolist(), strict=True))[:count]:
        top, left = max(int(cy - r) - 2, 0), max(int(cx - r) - 2, 0)
        bottom, right = min(int(cy + r) + 3, size), min(int(cx + r) + 3, size)
        if top >= bottom or left >= right:
            continue
        yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32) + 0.5
        stretch = rng.uniform(0.9, 1.1)
        dist = _length((yy - cy) * stretch, (xx - cx) / stretch)
        alpha = np.clip(r - dist + 0.5, 0.0, 1.0)[..., None]
        centre_light = 0.75 * np.exp(-((dist / (0.42 * r)) ** 2))[..., None]
        disc = colour * (1 - centre_light) + pallor * centre_light
        window = image[top:bottom, left:right]
        window[:] = window * (1 - alpha) + disc * alpha


def _paint_white_cell(
    rng: np.random.Generator,
    image: np.ndarray,
    grid: tuple[np.ndarray, np.ndarray],
    cell_name: str,
    rotate: Callable[[RGB], np.ndarray],
    textures: dict[str, np.ndarray],
    centre: np.ndarray,
    radius: float,
) -> np.ndarray:
    """Paint the white cell in place and return its exact mask.

    Shapes are signed distances in units of the cell radius (negative inside), drawn in a frame
    rotated by a random angle; soft 1-pixel edges for the image and the sign for the mask keep the
    two aligned.
    """
    cell, size = CELLS[cell_name], image.shape[0]
    angle = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    dy, dx = grid[0] - float(centre[0]), grid[1] - float(centre[1])
    u, v = (dx * cos + dy * sin) / radius, (dy * cos - dx * sin) / radius
    cell_sdf = _wobbly_disc(rng, u, v, 1.0, cell.wobble)
    nucleus_sdf = np.maximum(NUCLEUS_SHAPES[cell_name](rng, u, v), cell_sdf)
    fine = textures["fine"]

    cytoplasm = rotate(cell.cytoplasm) * (1 + 0.05 * fine[..., None])
    granules = _granules(textures["granules"], cell.granule_cover)
    cytoplasm = _mix(cytoplasm, rotate(cell.granule), granules)
    if cell.vacuoles:
        cytoplasm = _mix(cytoplasm, rotate((0.93, 0.93, 0.97)), _vacuoles(rng, u, v, radius))
    nucleus = rotate(cell.nucleus) * (1 + 0.16 * textures["chromatin"] + 0.05 * fine)[..., None]
    if cell.granules_over_nucleus:
        nucleus = _mix(nucleus, rotate(cell.granule), 0.8 * granules)

    image[:] = _mix(image, cytoplasm, _coverage(cell_sdf, radius))
    image[:] = _mix(image, nucleus, _coverage(nucleus_sdf, radius))
    mask = np.full((size, size), BACKGROUND, np.uint8)
    mask[cell_sdf < 0] = CYTOPLASM
    mask[nucleus_sdf < 0] = NUCLEUS
    return mask


def _apply_optics(rng: np.random.Generator, image: np.ndarray, domain: Domain) -> np.ndarray:
    """Add the microscope's uneven illumination, blur and sensor noise."""
    size = image.shape[0]
    x = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = x[None, :], x[:, None]
    direction = rng.uniform(0, 2 * math.pi)
    light = 1 + domain.illumination * (x * math.cos(direction) + y * math.sin(direction)) / 2
    light -= domain.vignette * (x**2 + y**2) / 2
    image = _blur(image * light[..., None], domain.blur_sigma)
    return image + domain.noise_std * _white_noise(rng, image.shape)


# ---- nucleus shapes: signed distance in units of the cell radius, negative inside ----


def _neutrophil_nucleus(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Draw three to five lobes along a C-shaped arc, joined by thin chromatin strands."""
    lobes = int(rng.integers(3, 6))
    span = math.radians(min(rng.uniform(52, 64) * lobes, 250))
    angles = rng.normal(0, 0.3) + np.linspace(-span / 2, span / 2, lobes)
    angles += rng.normal(0, 0.08, lobes)
    ring = rng.uniform(0.42, 0.52)
    centres = (ring * np.stack([np.cos(angles), np.sin(angles)], axis=1)).tolist()
    radii = rng.uniform(0.2, 0.25, lobes).tolist()
    shapes = [
        _ellipse(u - cu, v - cv, 1.3 * r, 0.85 * r, a + math.pi / 2)
        for (cu, cv), r, a in zip(centres, radii, angles.tolist(), strict=True)
    ]
    width = rng.uniform(0.035, 0.06)
    shapes += [_segment(u, v, p, q) - width for p, q in zip(centres, centres[1:], strict=False)]
    return np.minimum.reduce(shapes)


def _lymphocyte_nucleus(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Draw a large, round, slightly eccentric nucleus leaving a thin rim of cytoplasm."""
    shift = rng.uniform(0.06, 0.14)
    return _wobbly_disc(rng, u - shift, v, rng.uniform(0.76, 0.84), 0.03)


def _monocyte_nucleus(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Draw a folded, kidney-shaped nucleus: an off-centre ellipse with a bite out of it."""
    half_u, half_v = rng.uniform(0.58, 0.68), rng.uniform(0.4, 0.48)
    body = _ellipse(u, v - 0.15, half_u, half_v, rng.normal(0, 0.1))
    bite = rng.uniform(0.26, 0.34) - _length(u - rng.normal(0, 0.08), v - 0.15 + half_v + 0.12)
    return np.maximum(body, bite)


def _eosinophil_nucleus(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Draw two lobes joined by a strand ("spectacles")."""
    gap = rng.uniform(0.28, 0.36)
    left, right = [-gap, 0.1], [gap, 0.1 + rng.normal(0, 0.05)]
    radii = rng.uniform(0.24, 0.3, 2).tolist()
    lobes = [
        _ellipse(u - c[0], v - c[1], 0.9 * r, 1.15 * r, 0.3)
        for c, r in zip((left, right), radii, strict=True)
    ]
    return np.minimum.reduce([*lobes, _segment(u, v, left, right) - 0.05])


def _basophil_nucleus(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Draw an irregular clump of two or three lobes, later hidden under granules."""
    lobes = int(rng.integers(2, 4))
    centres = rng.uniform(-0.22, 0.22, (lobes, 2)).tolist()
    radii = rng.uniform(0.3, 0.4, lobes).tolist()
    return np.minimum.reduce(
        [_length(u - c[0], v - c[1]) - r for c, r in zip(centres, radii, strict=True)]
    )


NUCLEUS_SHAPES: dict[str, ShapeFn] = {
    "neutrophil": _neutrophil_nucleus,
    "lymphocyte": _lymphocyte_nucleus,
    "monocyte": _monocyte_nucleus,
    "eosinophil": _eosinophil_nucleus,
    "basophil": _basophil_nucleus,
}


# ---- geometry and texture helpers ----


def _length(u: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """Euclidean length of ``(u, v)``; several times faster than ``np.hypot`` on float32 grids."""
    return np.sqrt(u * u + v * v)


@cache
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of the pixel centres of a ``size`` x ``size`` crop."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _wobbly_disc(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, radius: float, wobble: float
) -> np.ndarray:
    """Signed distance to a disc whose radius ripples with a few low angular harmonics.

    Higher harmonics get smaller amplitudes so outlines stay smooth rather than star-shaped.
    """
    theta = np.arctan2(v, u)
    harmonics = range(2, 6)
    amplitudes = (rng.normal(0, wobble, 4) / np.arange(1, 5)).tolist()
    phases = rng.uniform(0, 2 * math.pi, 4).tolist()
    ripple = sum(
        a * np.cos(k * theta + p) for k, a, p in zip(harmonics, amplitudes, phases, strict=True)
    )
    return _length(u, v) - radius * (1 + ripple)


def _ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float, angle: float) -> np.ndarray:
    """Approximate signed distance to an ellipse with half-axes ``a``, ``b``, rotated."""
    c, s = math.cos(angle), math.sin(angle)
    p, q = (u * c + v * s) / a, (v * c - u * s) / b
    return (_length(p, q) - 1) * min(a, b)


def _segment(u: np.ndarray, v: np.ndarray, p: Sequence[float], q: Sequence[float]) -> np.ndarray:
    """Distance to the segment from ``p`` to ``q``."""
    du, dv = q[0] - p[0], q[1] - p[1]
    t = np.clip(((u - p[0]) * du + (v - p[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return _length(u - p[0] - t * du, v - p[1] - t * dv)


def _vacuoles(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Coverage of a few small clear vacuoles in the monocyte's cytoplasm."""
    count = int(rng.integers(0, 5))
    places = rng.uniform(0.62, 0.86, count).tolist(), rng.uniform(0, 2 * math.pi, count).tolist()
    holes = [
        _length(u - d * math.cos(a), v - d * math.sin(a)) - r
        for d, a, r in zip(*places, rng.uniform(0.04, 0.08, count).tolist(), strict=True)
    ]
    if not holes:
        return np.zeros(u.shape, np.float32)
    return 0.7 * _coverage(np.minimum.reduce(holes), radius)


def _granules(noise: np.ndarray, cover: float) -> np.ndarray:
    """Soft granule coverage: about the top ``cover`` share of a unit-variance noise field."""
    if cover <= 0:
        return np.zeros(noise.shape, np.float32)
    threshold = NormalDist().inv_cdf(1 - cover)
    return np.clip((noise - threshold) / 0.5, 0.0, 1.0)


def _coverage(sdf: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage (1 inside, 0 outside, a 1-pixel ramp) of a signed-distance shape."""
    return np.clip(0.5 - sdf * radius, 0.0, 1.0)


def _mix(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend ``top`` over ``base``; ``alpha`` is HxW."""
    return base + (top - base) * alpha[..., None]


def _noise_fields(rng: np.random.Generator, size: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """Unit-variance noise fields, one per Gaussian smoothing scale in pixels (periodic edges).

    All fields share one white-noise draw and one batched inverse FFT, which keeps texturing cheap.
    """
    spectrum = np.fft.rfft2(_white_noise(rng, (size, size)))
    fields = np.fft.irfft2(spectrum * _gaussian_gains(size, sigmas), (size, size))
    return fields / (fields.std(axis=(1, 2), keepdims=True) + 1e-6)


def _white_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-variance uniform noise: looks Gaussian, draws five times faster."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * math.sqrt(12.0)


@cache
def _gaussian_gains(size: int, sigmas: tuple[float, ...]) -> np.ndarray:
    """Frequency response of Gaussian smoothing at each scale, on the rfft2 grid of a crop."""
    frequencies = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2
    gains = np.exp(-2 * np.pi**2 * np.square(sigmas)[:, None, None] * frequencies)
    gains.flags.writeable = False
    return gains.astype(np.float32)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an HxWxC image with reflected edges."""
    half = max(int(3 * sigma + 0.5), 1)
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()
    height, width = image.shape[:2]
    padded = np.pad(image, ((half, half), (0, 0), (0, 0)), mode="reflect")
    image = sum(w * padded[i : i + height] for i, w in enumerate(taps))
    padded = np.pad(image, ((0, 0), (half, half), (0, 0)), mode="reflect")
    return sum(w * padded[:, i : i + width] for i, w in enumerate(taps))


def _hue_rotation(degrees: float, strength: float) -> Callable[[RGB], np.ndarray]:
    """Return a function that shifts a stain colour's hue and scales its saturation.

    The hue shift is a rotation about the grey axis of RGB space, which keeps brightness and
    models a different stain batch or camera white balance.
    """
    angle = np.deg2rad(degrees)
    k = np.full(3, 1 / np.sqrt(3))
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    rotation = np.cos(angle) * np.eye(3) + np.sin(angle) * cross
    rotation += (1 - np.cos(angle)) * np.outer(k, k)

    def rotate(colour: RGB) -> np.ndarray:
        shifted = rotation @ np.asarray(colour)
        grey = shifted.mean()
        return np.clip(grey + (shifted - grey) * strength, 0.0, 1.0).astype(np.float32)

    return rotate
