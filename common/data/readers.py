"""Hospital readers: one function per on-disk format, all checked the same strict way.

A hospital is one entry of ``cfg.data.hospitals``: a ``format`` plus that format's keys. File-based
formats only *list* their samples (image path, label, mask path) and report what the listing
shows to be wrong; one shared decoder then opens every file, so truncated or unreadable files,
mask sizes and empty hospitals are checked identically for every format. Every problem is
collected, never just the first, so a site's operator can fix the data in one pass.

Adding a format is one function registered in :data:`FORMATS`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import stat
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image, ImageFile
from PIL.TiffImagePlugin import IMAGELENGTH, IMAGEWIDTH

from common.data.splits import SPLITS, SplitSpec
from common.data.synthetic import generate_hospital, synthetic_labels
from common.data.types import (
    BACKGROUND,
    CYTOPLASM,
    NUCLEUS,
    DataProblem,
    DataVerificationError,
    HospitalData,
    ProblemKind,
)
from common.errors import JobError
from common.imaging import EXIF_ORIENTATION, eight_bit, load_checked, open_from_memory, turned

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff")
# Grey-level thresholds of ground-truth masks: <64 background, 64..191 cytoplasm, >=192 nucleus.
# Thresholds rather than exact values tolerate JPEG noise and stray values in real masks.
CYTOPLASM_MIN_GREY, NUCLEUS_MIN_GREY = 64, 192
# A mask pixel whose channels differ by more than this is coloured (JPEG noise on a grey mask
# stays far below it); a mask with more than MAX_COLOURED_SHARE of them is a colour mask.
MAX_GREY_SPREAD, MAX_COLOURED_SHARE = 48, 0.01

ZXAOYOU_CLASSES = {
    "1": "neutrophil",
    "2": "lymphocyte",
    "3": "monocyte",
    "4": "eosinophil",
    "5": "basophil",
}
MATEK19_CLASSES = {
    "BAS": "basophil",
    "EBO": "erythroblast",
    "EOS": "eosinophil",
    "KSC": "smudge_cell",
    "LYA": "atypical_lymphocyte",
    "LYT": "lymphocyte",
    "MMZ": "metamyelocyte",
    "MOB": "monoblast",
    "MON": "monocyte",
    "MYB": "myelocyte",
    "MYO": "myeloblast",
    "NGB": "band_neutrophil",
    "NGS": "neutrophil",
    "PMB": "promyelocyte_bilobed",
    "PMO": "promyelocyte",
}
NAMED_CLASS_MAPS = {"matek19": MATEK19_CLASSES}
ROOT_KEYS = ("root", "mask_root")


@dataclass(frozen=True)
class Source:
    """What a reader gets: one hospital's normalised config and the class vocabulary."""

    hospital: str
    spec: Mapping[str, Any]
    classes: tuple[str, ...]
    keep_arrays: bool

    def problem(self, kind: ProblemKind, path: Path | str, detail: str) -> DataProblem:
        """Build a problem about this hospital."""
        return DataProblem(self.hospital, str(path), kind, detail)


@dataclass(frozen=True)
class Entry:
    """One listed sample of a file-based format, before any file is opened."""

    image: Path
    label: int
    mask: Path | None


@dataclass
class Listing:
    """A file-based format's samples and the problems its listing revealed."""

    root: Path
    has_masks: bool
    entries: list[Entry] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)


@dataclass
class ReadResult:
    """A hospital's usable samples plus every problem found while reading it.

    ``images`` and ``masks`` stay empty unless the reader was asked to keep arrays (verification
    decodes every file but keeps none, so it can check large datasets in little memory).
    """

    hospital: str
    classes: tuple[str, ...]
    has_masks: bool
    labels: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    problems: list[DataProblem] = field(default_factory=list)

    def to_data(self) -> HospitalData:
        """Freeze the kept arrays into a read-only HospitalData, safe to share via the cache."""
        labels = np.asarray(self.labels, dtype=np.int64)
        for array in [labels, *self.images, *self.masks]:
            array.flags.writeable = False
        return HospitalData(
            name=self.hospital,
            classes=self.classes,
            images=self.images,
            labels=labels,
            masks=self.masks if self.has_masks else None,
            sample_ids=self.sample_ids,
        )


@dataclass(frozen=True)
class Format:
    """A registered hospital format: its reader and the config keys it accepts."""

    read: Callable[[Source], ReadResult]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


# ---- public entry points ----


def hospital_names(data_cfg: Any) -> list[str]:
    """Return the hospital keys of ``data_cfg.hospitals`` in config order.

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node.

    Returns
    -------
    list[str]
        Hospital names; the simulated node's ``partition-id`` indexes this list.

    Raises
    ------
    JobError
        For a name YAML read as a number (``2019:``), which no text lookup would find, or one
        that is no folder name of its own (``a/b``, ``..``): a hospital's name names its
        folders (its pretraining heads, its post-training outputs).
    """
    names = list(data_cfg.get("hospitals") or {})
    for name in names:
        if not isinstance(name, str):
            raise JobError(f"data.hospitals: hospital name {name} must be text; quote it: '{name}'")
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise JobError(
                f"data.hospitals: hospital name '{name}' must be a folder name of its own "
                "(no '/', '\\', '.' or '..')"
            )
    return names


def federated_hospitals(data_cfg: Any, nodes: int) -> list[str]:
    """The hospitals a federation of ``nodes`` simulated SuperNodes trains on, in node order.

    Real data must match the nodes one to one. Synthetic hospitals are generated, so fewer
    nodes than configured hospitals take the first ones: a bare ``flwr run .`` simulates 2
    SuperNodes whatever the config says, and still trains on the embedded default.

    Raises
    ------
    ValueError
        When the nodes cannot be matched to the configured hospitals.
    """
    names = hospital_names(data_cfg)
    if nodes == len(names):
        return names
    synthetic = all(spec.get("format") == "synthetic" for spec in data_cfg.hospitals.values())
    if synthetic and 0 < nodes < len(names):
        return names[:nodes]
    raise ValueError(
        f"{len(names)} hospitals are configured but {nodes} SuperNodes are connected; in "
        f'simulation start the run with --federation-config "num-supernodes={len(names)}" '
        "(w3s-simulate does this for you)"
    )


def verify_data(data_cfg: Any, hospitals: Sequence[str] | None = None) -> list[DataProblem]:
    """Open every file of the given hospitals and return every problem found.

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node.
    hospitals
        Hospital names to check; all configured hospitals when ``None``.

    Returns
    -------
    list[DataProblem]
        Empty when the data is clean. File paths in it must not leave the site.
    """
    return [
        problem
        for result in read_hospitals(data_cfg, hospitals, keep_arrays=False)
        for problem in result.problems
    ]


def split_problems(data_cfg: Any, result: ReadResult) -> list[DataProblem]:
    """The splits of a cleanly read hospital that training would draw without any image.

    Reading checks files one by one; a hospital of a few images per class reads cleanly and
    yet leaves a split empty (one of two images goes to validation, none to test; a k-fold
    split of more folds than images): training refuses an empty training or validation split
    every round, post-training an empty test split. A test fraction of 0 asks for none. The
    splits are drawn as training draws them (:meth:`SplitSpec.indices` over the same labels).

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node; its ``split`` must be valid (:func:`check_split`).
    result
        The hospital as read by :func:`read_hospitals`, without problems.

    Returns
    -------
    list[DataProblem]
        One ``empty_split`` per empty split, with what to change.
    """
    spec = SplitSpec.of(data_cfg)
    parts = spec.indices(np.asarray(result.labels, dtype=np.int64))
    wanted = [s for s, share in zip(SPLITS, spec.fractions, strict=True) if share > 0 or spec.folds]
    return [
        DataProblem(result.hospital, "", "empty_split", empty_split_detail(data_cfg, split))
        for split in SPLITS
        if split in wanted and not len(parts[split])
    ]


def empty_split_detail(data_cfg: Any, split: str) -> str:
    """Why a hospital's ``split`` holds no image and what to change: one text for every check."""
    remedy = (
        "data.split.fractions" if data_cfg.split.get("folds") is None else "fewer data.split.folds"
    )
    return (
        f"its {split} split holds no image (too few images per class; add images, or set {remedy})"
    )


def load_hospital(data_cfg: Any, name: str) -> HospitalData:
    """Read and verify one hospital's data, once per process.

    The cache is keyed on the hospital's config (roots made absolute) and the vocabulary, so two
    configs naming the same data share one copy. The returned arrays are read-only because they
    are shared; copy before modifying.

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node.
    name
        Hospital key in ``data_cfg.hospitals``.

    Returns
    -------
    HospitalData
        All images of the hospital at native size.

    Raises
    ------
    DataVerificationError
        With every problem found, when any file or config entry is wrong.
    """
    return _load_cached(hospital_key(data_cfg, name))


def hospital_key(data_cfg: Any, name: str) -> str:
    """Return a canonical JSON text of everything that determines a hospital's data.

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node.
    name
        Hospital key in ``data_cfg.hospitals``.

    Returns
    -------
    str
        Hashable cache key; equal for configs that read the same data.
    """
    hospitals = data_cfg.get("hospitals") or {}
    spec = _plain(hospitals[name]) if name in hospitals else None
    if isinstance(spec, dict):
        spec = {
            key: _absolute(value) if key in ROOT_KEYS and _is_path(value) else value
            for key, value in spec.items()
        }
        if isinstance(spec.get("class_map"), dict):  # YAML keys may be numbers and names both
            spec["class_map"] = {str(k): v for k, v in spec["class_map"].items()}
    classes = _plain(data_cfg.get("classes"))
    return json.dumps({"name": name, "spec": spec, "classes": classes}, sort_keys=True, default=str)


def read_hospitals(
    data_cfg: Any, hospitals: Sequence[str] | None = None, keep_arrays: bool = False
) -> list[ReadResult]:
    """Read each hospital with every problem collected; the engine behind verify and load.

    Parameters
    ----------
    data_cfg
        The ``cfg.data`` node.
    hospitals
        Hospital names; all configured hospitals when ``None``.
    keep_arrays
        Keep the decoded images and masks (loading) or drop them after checking (verifying).

    Returns
    -------
    list[ReadResult]
        One result per hospital, in the given order.
    """
    names = hospital_names(data_cfg) if hospitals is None else list(hospitals)
    if not names:
        empty = DataProblem("", "", "bad_config", "data.hospitals names no hospital")
        return [ReadResult("", (), has_masks=False, problems=[empty])]
    return [_read(hospital_key(data_cfg, name), keep_arrays) for name in names]


# ---- dispatch ----


@functools.cache
def _load_cached(key: str) -> HospitalData:
    """Load the hospital described by ``key``; failures raise and are not cached."""
    result = _read(key, keep_arrays=True)
    if result.problems:
        raise DataVerificationError(result.problems)
    log.info("hospital %s: loaded %d images", result.hospital, len(result.labels))
    return result.to_data()


def _read(key: str, keep_arrays: bool) -> ReadResult:
    """Validate a hospital's config, run its format's reader and check it is not empty."""
    described = json.loads(key)
    name, spec = described["name"], described["spec"]
    classes = tuple(described["classes"] or ())
    result = ReadResult(name, classes, has_masks=False)
    result.problems = _config_problems(name, spec, classes)
    if result.problems:
        return result
    source = Source(name, spec, classes, keep_arrays)
    result = FORMATS[spec["format"]].read(source)
    blocking = {"missing_root", "bad_config"}
    if not result.labels and not any(p.kind in blocking for p in result.problems):
        where = spec.get("root", "")
        result.problems.append(source.problem("empty_hospital", where, "no usable image found"))
    result.problems.sort(key=lambda problem: (problem.path, problem.kind))  # file order
    return result


def _config_problems(name: str, spec: Any, classes: tuple[str, ...]) -> list[DataProblem]:
    """Check the parts of a hospital's config that every format shares, before touching data."""
    return [DataProblem(name, "", "bad_config", detail) for detail in _config_errors(spec, classes)]


def _config_errors(spec: Any, classes: tuple[str, ...]) -> list[str]:
    """Describe what is wrong with a hospital's config entry and the vocabulary, if anything."""
    if spec is None:
        return ["no hospital of this name in data.hospitals"]
    if (
        not classes
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) < len(classes)
    ):
        return [f"data.classes must be a non-empty list of distinct names, got {list(classes)}"]
    if not isinstance(spec, dict) or spec.get("format") not in FORMATS:
        format_name = spec.get("format") if isinstance(spec, dict) else spec
        return [f"unknown format {format_name!r}; expected one of {sorted(FORMATS)}"]
    reader = FORMATS[spec["format"]]
    errors = [f"missing key {key!r}" for key in reader.required if spec.get(key) is None]
    unknown = sorted(set(spec) - {"format", *reader.required, *reader.optional})
    errors += [f"unknown key {key!r} for format {spec['format']!r}" for key in unknown]
    for key in ROOT_KEYS:
        if key in spec and spec[key] is not None and not _is_path(spec[key]):
            errors.append(f"{key} must be a folder path, got {spec[key]!r}")
    extensions = spec.get("extensions")
    if extensions is not None and not (
        isinstance(extensions, str)
        or (isinstance(extensions, list) and all(isinstance(e, str) for e in extensions))
    ):
        errors.append(f"extensions must be a suffix or a list of them, got {extensions!r}")
    class_map = spec.get("class_map")
    if isinstance(class_map, str) and class_map.casefold() not in NAMED_CLASS_MAPS:
        errors.append(f"unknown class_map {class_map!r}; built-in: {sorted(NAMED_CLASS_MAPS)}")
    elif class_map is not None and not isinstance(class_map, str | dict):
        errors.append(f"class_map must be a mapping or a built-in name, got {class_map!r}")
    return errors


def _is_path(value: Any) -> bool:
    """A folder path; an empty one would be the working folder, not a missing setting."""
    return isinstance(value, str | os.PathLike) and bool(str(value).strip())


def _plain(node: Any) -> Any:
    """Turn an OmegaConf node (or plain value) into resolved builtin containers."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _absolute(path: str) -> str:
    """Resolve a configured path against the current working directory, normalising ``..``."""
    return os.path.abspath(os.path.expanduser(str(path)))


# ---- class names ----


def _class_map(source: Source, default: Mapping[str, str]) -> dict[str, str]:
    """Return the format's default class map updated by the hospital's ``class_map`` key.

    ``class_map`` is either the name of a built-in map (``matek19``) or a mapping whose entries
    override the default's. Keys are compared as :func:`_folded` names.
    """
    override = source.spec.get("class_map") or {}
    if isinstance(override, str):
        override = NAMED_CLASS_MAPS[override.casefold()]
    merged = {**default, **override}
    return {_folded(str(key)): str(value) for key, value in merged.items()}


def _folded(name: str) -> str:
    """A class name as compared: case-insensitive and in one Unicode form.

    macOS file systems store folder names decomposed (``e`` + a combining accent, U+0301) and
    YAML typed elsewhere holds them composed (U+00E9): two names that print alike.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _class_index(raw: str, class_map: Mapping[str, str], classes: Sequence[str]) -> int | None:
    """Map a raw class (folder name, label id) through the map into the vocabulary, or ``None``.

    Names missing from the map are looked up in the vocabulary directly, case-insensitively, so
    folders already named after the vocabulary need no map.
    """
    name = _folded(class_map.get(_folded(raw), raw))
    vocabulary = [_folded(c) for c in classes]
    return vocabulary.index(name) if name in vocabulary else None


def _unknown_class_detail(raw: str, class_map: Mapping[str, str], classes: Sequence[str]) -> str:
    """Explain why a raw class could not be placed in the vocabulary."""
    mapped = class_map.get(_folded(raw), raw)
    via = f" (mapped to {mapped!r})" if mapped != raw else ""
    return f"class {raw!r}{via} is not in the vocabulary {list(classes)}"


# ---- file formats: listing ----


def _list_zxaoyou(source: Source) -> Listing:
    """List zxaoyou/segmentation_WBC: ``<subset>/NNN.bmp`` + ``NNN.png``, labels in a CSV."""
    root = Path(source.spec["root"])
    subset = str(source.spec["subset"])
    listing = Listing(root, has_masks=True)
    folder, label_file = root / subset, root / f"Class Labels of {subset}.csv"
    if not (_require_dir(source, root, listing) and _require_dir(source, folder, listing)):
        return listing
    if not label_file.is_file():
        listing.problems.append(source.problem("missing_label", label_file, "label file not found"))
        return listing
    images: dict[int, Path] = {}
    for path in _image_files(source, listing, folder, (".bmp",), recursive=False):
        if not _is_image_id(path.stem):
            detail = "file name is not a numeric image id, so it has no label row"
            listing.problems.append(source.problem("missing_label", path, detail))
        elif (image_id := int(path.stem)) in images:
            detail = f"{images[image_id].name} has the same image id {image_id}, and its label row"
            listing.problems.append(source.problem("missing_label", path, detail))
        else:
            images[image_id] = path
    labels = _read_label_file(source, label_file, folder, images, listing)
    if labels is None:
        return listing
    masks = _files_by_stem(source, listing, folder, (".png",))  # 001.PNG beside 001.BMP too
    for image_id in sorted(images.keys() | labels.keys()):
        path = images.get(image_id, folder / f"{image_id:03d}.bmp")
        if image_id not in labels:
            detail = f"no row for image id {image_id} in {label_file.name}"
            listing.problems.append(source.problem("missing_label", path, detail))
        elif image_id not in images:
            detail = f"listed in labels but file missing ({label_file.name})"
            listing.problems.append(source.problem("unreadable_image", path, detail))
        elif labels[image_id] is not None:
            _add_entry(source, listing, path, labels[image_id], masks.get(path.stem))
    _drop_repeated_files(source, listing, root)
    return listing


def _is_image_id(text: str) -> bool:
    """Whether ``text`` is a numeric image id (``isdigit`` alone also takes ``²``)."""
    return text.isascii() and text.isdigit()


def _read_label_file(
    source: Source, label_file: Path, folder: Path, images: Mapping[int, Path], listing: Listing
) -> dict[int, int | None] | None:
    """Parse a zxaoyou label CSV into image id -> vocabulary index (``None``: bad label row).

    The header row ("image ID,class label" or "image ID,class") is recognised by its
    non-numeric first cell. Bad rows become problems naming the image file and the CSV row;
    a file that cannot be read (no permission, an I/O error on a share) or is not UTF-8 text
    (a spreadsheet saved in a legacy encoding) is one problem, and None.
    """
    class_map = _class_map(source, ZXAOYOU_CLASSES)
    labels: dict[int, int | None] = {}
    try:
        text = label_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        detail = f"not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8 CSV"
        listing.problems.append(source.problem("missing_label", label_file, detail))
        return None
    except OSError as error:
        detail = f"the label file cannot be read: {error.strerror or error}"
        listing.problems.append(source.problem("missing_label", label_file, detail))
        return None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as error:  # a field over csv's size limit: a binary file named .csv
        detail = f"not a CSV label file ({error})"
        listing.problems.append(source.problem("missing_label", label_file, detail))
        return None
    for row_number, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not any(cells) or (row_number == 1 and not _is_image_id(cells[0])):
            continue
        where = f"{label_file.name} row {row_number}"
        if len(cells) < 2 or not _is_image_id(cells[0]):
            detail = f"{where}: expected 'image id,class', got {row}"
            listing.problems.append(source.problem("missing_label", label_file, detail))
            continue
        image_id, raw = int(cells[0]), cells[1]
        index = _class_index(raw, class_map, source.classes)
        path = images.get(image_id, folder / f"{image_id:03d}.bmp")
        if index is None:
            detail = f"{where}: {_unknown_class_detail(raw, class_map, source.classes)}"
            listing.problems.append(source.problem("unknown_class", path, detail))
        elif labels.setdefault(image_id, index) != index:
            detail = f"{where}: another row gives image id {image_id} a different class"
            listing.problems.append(source.problem("missing_label", path, detail))
            index = None
        if index is None:
            labels[image_id] = None
    return labels


def _list_raabin(source: Source) -> Listing:
    """List Raabin-WBC ground truth: ``GrTh/Original/<Class>/x.jpg`` + ``GrTh/Ground Truth/...``."""
    root = Path(source.spec["root"])
    ground_truth = root / "GrTh"
    return _list_class_tree(
        source, root, ground_truth / "Original", ground_truth / "Ground Truth", IMAGE_EXTENSIONS
    )


def _list_class_folders(source: Source) -> Listing:
    """List a ``<root>/<class folder>/...image`` tree (Matek19, INT_20), masks optional."""
    root = Path(source.spec["root"])
    mask_root = source.spec.get("mask_root")
    extensions = source.spec.get("extensions") or IMAGE_EXTENSIONS
    if isinstance(extensions, str):  # `extensions: .png` means one, not its four characters
        extensions = [extensions]
    return _list_class_tree(
        source, root, root, Path(mask_root) if mask_root else None, tuple(extensions)
    )


def _list_class_tree(
    source: Source,
    root: Path,
    image_root: Path,
    mask_root: Path | None,
    extensions: tuple[str, ...],
) -> Listing:
    """List ``image_root/<class folder>/...`` images, with masks at the same place in ``mask_root``.

    A class folder whose name does not map into the vocabulary is one problem for the whole
    folder, and image files lying directly in ``image_root`` have no label.
    """
    listing = Listing(root, has_masks=mask_root is not None)
    if not _require_dir(source, root, listing):
        return listing
    inner = [folder for folder in (image_root, mask_root) if folder not in (None, root)]
    if not all([_require_dir(source, folder, listing) for folder in inner]):  # report each one
        return listing
    class_map = _class_map(source, {})
    files, class_folders = _scan(source, listing, image_root)
    for path in _with_extension(files, extensions):
        detail = "image outside any class folder has no label"
        listing.problems.append(source.problem("missing_label", path, detail))
    masks: dict[Path, dict[str, Path]] = {}
    masked: dict[tuple[Path, str], Path] = {}  # the image each mask serves
    # Masks beside their images (mask_root = root) are the files of the other extensions.
    mask_kinds = sorted(_suffixes(IMAGE_EXTENSIONS) - _suffixes(extensions))
    mask_extensions = mask_kinds if mask_root == image_root else IMAGE_EXTENSIONS
    for folder in class_folders:
        files = _image_files(source, listing, folder, extensions, recursive=True)
        index = _class_index(folder.name, class_map, source.classes)
        if index is None and files:
            detail = _unknown_class_detail(folder.name, class_map, source.classes)
            listing.problems.append(source.problem("unknown_class", folder, detail))
            continue
        for path in files:
            mask = None
            if mask_root is not None:
                mask_dir = mask_root / path.parent.relative_to(image_root)
                if mask_dir not in masks:
                    masks[mask_dir] = _files_by_stem(source, listing, mask_dir, mask_extensions)
                mask = masks[mask_dir].get(path.stem)
                if (mask_dir, path.stem) in masked:
                    other = masked[mask_dir, path.stem].name
                    detail = f"named like {other}, so one mask would serve both"
                    listing.problems.append(source.problem("ambiguous_mask", path, detail))
                    continue
                masked[mask_dir, path.stem] = path
            _add_entry(source, listing, path, index, mask)
    _drop_repeated_files(source, listing, image_root)
    return listing


def _add_entry(
    source: Source, listing: Listing, image: Path, label: int, mask: Path | None
) -> None:
    """Append a sample, or a missing_mask problem when the format has masks but not this one."""
    if listing.has_masks and mask is None:
        detail = "no ground-truth mask for this image"
        listing.problems.append(source.problem("missing_mask", image, detail))
        return
    listing.entries.append(Entry(image, label, mask))


def _drop_repeated_files(source: Source, listing: Listing, image_root: Path) -> None:
    """Report a file listed twice through links: once in train and once in test, or two labels.

    One file is one (device, inode): a symbolic link resolves to it, and a hard link is it
    under a second name. The path without a symbolic link in it is kept and the others are
    named, so the message never sends anyone to delete the real image.
    """
    by_file: dict[tuple[int, int] | str, list[Entry]] = {}
    for entry in listing.entries:
        by_file.setdefault(_file_identity(entry.image), []).append(entry)
    repeats: set[Path] = set()
    for group in (group for group in by_file.values() if len(group) > 1):
        own = next((e for e in group if not _link_in_class(e.image, image_root)), group[0])
        for entry in group:
            if entry is not own:
                detail = f"the same file as {own.image}, reached through a link"
                listing.problems.append(source.problem("repeated_image", entry.image, detail))
                repeats.add(entry.image)
    listing.entries = [entry for entry in listing.entries if entry.image not in repeats]


def _file_identity(path: Path) -> tuple[int, int] | str:
    """The file behind ``path``: its (device, inode) when it has hard links, else its real path.

    The inode tells only a file with several names apart (``st_nlink`` > 1); some network
    shares and FUSE mounts report inode 0 for every file, which would make all one file.
    """
    try:
        status = path.stat()
    except OSError:  # reported when the image is decoded
        return os.path.realpath(path)
    if status.st_ino == 0 or status.st_nlink < 2:
        return os.path.realpath(path)
    return status.st_dev, status.st_ino


def _link_in_class(path: Path, image_root: Path) -> bool:
    """Whether ``path`` or a folder between it and its class folder is a link.

    A class folder that is a link itself (or a data root on a linked disk) leads to the real
    file as much as a plain folder does.
    """
    class_folder, *below = path.relative_to(image_root).parts
    inside = image_root / class_folder
    return any(inside.joinpath(*below[:n]).is_symlink() for n in range(1, len(below) + 1))


def _require_dir(source: Source, path: Path, listing: Listing) -> bool:
    """Report a missing folder as missing_root; return whether it exists."""
    found = _is_folder(source, listing, path)
    if found is False:
        listing.problems.append(source.problem("missing_root", path, "folder not found"))
    return bool(found)


def _is_folder(source: Source, listing: Listing, path: Path) -> bool | None:
    """Whether ``path`` is a folder; None, reported, when a folder above it cannot be searched."""
    try:
        return path.is_dir()
    except OSError as error:
        listing.problems.append(source.problem("unreadable_folder", path, _reason(error)))
        return None


def _image_files(
    source: Source, listing: Listing, folder: Path, extensions: Sequence[str], recursive: bool
) -> list[Path]:
    """Image files in ``folder`` (below it with ``recursive``), sorted; see :func:`_scan`."""
    if not recursive:
        return _with_extension(_scan(source, listing, folder)[0], extensions)
    return sorted(_with_extension(_files_below(source, listing, folder), extensions))


def _with_extension(files: Sequence[Path], extensions: Sequence[str]) -> list[Path]:
    """The files with one of ``extensions``, compared case-insensitively."""
    wanted = _suffixes(extensions)
    return [path for path in files if path.suffix.casefold() in wanted]


def _suffixes(extensions: Sequence[str]) -> set[str]:
    """``extensions`` as lower-case suffixes with their dot (``JPG`` -> ``.jpg``)."""
    return {ext.casefold() if ext.startswith(".") else f".{ext.casefold()}" for ext in extensions}


def _files_below(source: Source, listing: Listing, folder: Path) -> list[Path]:
    """Every file below ``folder``: its own folders first, then linked ones, each real one once.

    Sites link a scanner's export folder into a class folder, so links are followed. A folder
    reached both ways takes its images' ids (and so its masks' place) from its own path, not a
    convenience link to it (``latest -> patient3``). A link up to a folder holding ``folder``
    or the class folders beside it (the data root, wherever a linked class folder really lies)
    would read other classes under this one: it is reported, not followed, so a loop ends.
    """
    start, data = Path(os.path.realpath(folder)), Path(os.path.realpath(folder.parent))
    holders = {*start.parents, data, *data.parents}
    walked: set[Path] = set()
    pending = deque([folder])
    files: list[Path] = []
    while pending:
        current = pending.popleft()
        real = Path(os.path.realpath(current))
        if real in holders:
            detail = f"a link up to {real}, which holds the class folders: not followed"
            listing.problems.append(source.problem("bad_link", current, detail))
            continue
        if real in walked:
            continue
        walked.add(real)
        found, subfolders = _scan(source, listing, current)
        files += found
        own, linked = [], []
        for path in subfolders:
            (linked if path.is_symlink() else own).append(path)
        pending.extendleft(reversed(own))
        pending.extend(linked)
    return files


def _scan(source: Source, listing: Listing, folder: Path) -> tuple[list[Path], list[Path]]:
    """The files and the sub-folders in ``folder``, sorted, links followed; hidden ones skipped.

    Hidden names are not data (``.DS_Store``, AppleDouble ``._x.jpg``, ``.thumbnails/``). What
    cannot be read is reported, not skipped, so no image is left out without a word: a folder
    that cannot be listed or searched (permissions), a link whose target is gone (an unmounted
    share) or loops.
    """
    try:
        names = sorted(name for name in os.listdir(folder) if not name.startswith("."))
    except OSError as error:
        listing.problems.append(source.problem("unreadable_folder", folder, _reason(error)))
        return [], []
    files, folders = [], []
    for path in (folder / name for name in names):
        try:
            mode = path.stat().st_mode
        except OSError as error:
            try:
                linked = path.is_symlink()
            except OSError:  # the folder lists its names but cannot be searched
                linked = False
            if not linked:
                listing.problems.append(source.problem("unreadable_folder", folder, _reason(error)))
                return [], []
            detail = f"a link to {os.readlink(path)} that cannot be followed ({_reason(error)})"
            listing.problems.append(source.problem("bad_link", path, detail))
            continue
        if stat.S_ISDIR(mode):
            folders.append(path)
        elif stat.S_ISREG(mode):
            files.append(path)
    return files, folders


def _reason(error: OSError) -> str:
    """An OSError's own words (``Permission denied``), without the path the problem names."""
    return error.strerror or str(error)


def _files_by_stem(
    source: Source, listing: Listing, folder: Path, extensions: Sequence[str]
) -> dict[str, Path]:
    """Index the image files of a mask folder by stem (mask extensions may differ from images)."""
    if not _is_folder(source, listing, folder):
        return {}  # no masks here: each image's missing_mask says so
    by_stem: dict[str, Path] = {}
    for path in _image_files(source, listing, folder, extensions, recursive=False):
        if path.stem in by_stem:
            detail = (
                f"a second mask for the images named {path.stem}, beside {by_stem[path.stem].name}"
            )
            listing.problems.append(source.problem("ambiguous_mask", path, detail))
        else:
            by_stem[path.stem] = path
    return by_stem


# ---- file formats: decoding ----


class _BadFile(Exception):
    """A file that could not be decoded; ``truncated`` tells the two failure kinds apart."""

    def __init__(self, detail: str, truncated: bool) -> None:
        super().__init__(detail)
        self.truncated = truncated


def _read_files(lister: Callable[[Source], Listing]) -> Callable[[Source], ReadResult]:
    """Turn a lister into a reader: list the samples, then decode and check every file."""

    def read(source: Source) -> ReadResult:
        listing = lister(source)
        result = ReadResult(source.hospital, source.classes, listing.has_masks)
        result.problems = listing.problems
        first_of: dict[bytes, Entry] = {}  # digest of an image's bytes -> the entry read first
        with _strict_decoding():
            for entry in listing.entries:
                _decode_entry(source, listing, entry, result, first_of)
        return result

    return read


def _decode_entry(
    source: Source,
    listing: Listing,
    entry: Entry,
    result: ReadResult,
    first_of: dict[bytes, Entry],
) -> None:
    """Decode one sample's image and mask, check they agree, and add it to ``result`` if usable.

    ``first_of`` holds the digests of the hospital's images decoded so far, so that a copy of
    one is reported (:func:`_copy_problem`) instead of read a second time.
    """
    try:
        image, stored = _decode(entry.image, "RGB")
    except _BadFile as error:
        kind: ProblemKind = "truncated_image" if error.truncated else "unreadable_image"
        result.problems.append(source.problem(kind, entry.image, str(error)))
        return
    first = first_of.setdefault(stored.digest, entry)
    if first is not entry:
        result.problems.append(_copy_problem(source, entry, first))
        return
    mask = None
    if entry.mask is not None:
        try:
            mask = _grey_to_classes(_grey_mask(entry.mask, stored))
        except _BadFile as error:
            result.problems.append(source.problem("unreadable_mask", entry.mask, str(error)))
            return
        except _NotGreyMask as error:
            result.problems.append(source.problem("bad_mask", entry.mask, str(error)))
            return
        if mask.shape != image.shape[:2]:
            detail = f"mask is {_size(mask)} but its image {entry.image.name} is {_size(image)}"
            result.problems.append(source.problem("mask_size_mismatch", entry.mask, detail))
            return
    result.labels.append(entry.label)
    result.sample_ids.append(entry.image.relative_to(listing.root).as_posix())
    if source.keep_arrays:
        result.images.append(image)
        if mask is not None:
            result.masks.append(mask)


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated files instead of silently padding them with grey."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _copy_problem(source: Source, copy: Entry, first: Entry) -> DataProblem:
    """Report an image whose bytes are those of one listed before it, which is kept.

    A copy is no link (:func:`_drop_repeated_files`): a download saved twice lands in train
    and in test, a leak the scores would not show; one image filed under two classes trains
    with two labels.
    """
    detail = f"a byte-identical copy of {first.image}"
    if copy.label == first.label:
        return source.problem("repeated_image", copy.image, f"{detail}; delete one of them")
    classes = source.classes
    detail += (
        f", filed as {classes[first.label]} there and as {classes[copy.label]} here; "
        "keep it under its own class only"
    )
    return source.problem("conflicting_label", copy.image, detail)


@dataclass(frozen=True)
class StoredFrame:
    """How a file stores its pixels: its (width, height) and its EXIF orientation (1: upright).

    ``digest`` is a hash of the file's bytes: byte-identical copies of an image share it.
    """

    size: tuple[int, int]
    orientation: int
    digest: bytes


def _decode(
    path: Path, mode: str, image: StoredFrame | None = None
) -> tuple[np.ndarray, StoredFrame]:
    """Fully decode an image file into a uint8 array in ``mode`` (RGB drops alpha, as Matek's).

    The array is the file as viewers show it, turned as its EXIF orientation says, as
    ``w3s-predict`` reads new images. A mask without a tag of its own, given its ``image``'s
    stored frame, is turned with its image when it is stored as the image is (same size): a
    tool that ignored the tag drew it on the stored pixels. One already of the turned size was
    drawn on the image as shown and stays. (A square mask drawn on the shown image of a turned
    square image cannot be told apart, and is taken as stored.) Returns the file's stored frame
    too, with a digest of the very bytes decoded (read once, hashed, not kept).

    A file of several frames is refused naming their count (:func:`load_checked`).

    Raises
    ------
    _BadFile
        For empty, unidentifiable, truncated, multi-frame or otherwise corrupt files.
    """
    if path.stat().st_size == 0:
        raise _BadFile("empty file (0 bytes)", truncated=False)
    try:
        content = path.read_bytes()
        with open_from_memory(content) as picture:
            tag, turned_on_load = _load_with_tag(picture)
            digest = hashlib.blake2b(content, digest_size=16).digest()
            stored = StoredFrame(_stored_size(picture), int(tag or 1), digest)
            turn = 1 if turned_on_load else stored.orientation
            if tag is None and image is not None and stored.size == image.size:
                turn = image.orientation
            array = np.asarray(eight_bit(turned(picture, turn)).convert(mode), dtype=np.uint8)
            return array, stored
    # PIL signals corrupt data with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, ...); any of them makes the file unusable, and the report must go on.
    except Exception as error:
        detail = f"cannot decode: {type(error).__name__}: {error}"
        raise _BadFile(detail, truncated="truncat" in str(error).casefold()) from error


def _load_with_tag(picture: Image.Image) -> tuple[int | None, bool]:
    """Decode ``picture``: its EXIF orientation tag, and whether loading turned the pixels.

    The tag is None where the file has none, unlike 1 (upright) written by a tool. Pillow's
    TIFF loader turns the pixels by their tag as it loads them and drops the tag, so a TIFF's
    is read before; a PNG's may follow its pixels (reading it loads them, before
    :func:`load_checked` could see how they are stored), so the others' are read after.
    """
    early = picture.getexif().get(EXIF_ORIENTATION) if picture.format == "TIFF" else None
    load_checked(picture)
    late = picture.getexif().get(EXIF_ORIENTATION)
    return (early, True) if early is not None and late is None else (late, False)


def _stored_size(picture: Image.Image) -> tuple[int, int]:
    """The (width, height) a file stores its pixels in; a TIFF's size is already turned."""
    if picture.format == "TIFF":
        return picture.tag_v2[IMAGEWIDTH], picture.tag_v2[IMAGELENGTH]
    return picture.size


class _NotGreyMask(Exception):
    """A mask that decodes but does not say background / cytoplasm / nucleus in grey levels."""


MASK_FORM = "masks are grey: 0 background, 128 cytoplasm, 255 nucleus (docs/data.md)"


def _grey_mask(path: Path, image: StoredFrame) -> np.ndarray:
    """A mask file as a uint8 grey array, or :class:`_NotGreyMask` for another kind of mask.

    The grey levels are the classes, so a mask in colours (a red nucleus and a green cytoplasm
    have about one brightness) or in class codes (0, 1, 2: all below the cytoplasm's level)
    would be read as the wrong classes, silently; each is refused by name instead. So is a
    mask with transparent pixels: their hidden colour would be read (a transparent white
    background as nucleus), and one that marks no cell pixel, since every image is a crop
    around a cell: an annotation never drawn would teach that the cell is background.
    """
    pixels = _decode(path, "RGBA", image)[0]
    # Transparent black (a common export's background) is background as read; another hidden
    # colour would be read as a class.
    hidden = (pixels[..., 3] < 255) & (pixels[..., :3].max(axis=2) > 0)
    if transparent := int(hidden.sum()):
        raise _NotGreyMask(
            f"{transparent} of its {hidden.size} pixels are transparent with a colour that "
            f"would be read as their class; save it without alpha: {MASK_FORM}"
        )
    colour = pixels[..., :3]
    spread = colour.max(axis=2).astype(np.int16) - colour.min(axis=2)
    coloured = float((spread > MAX_GREY_SPREAD).mean())
    if coloured > MAX_COLOURED_SHARE:
        raise _NotGreyMask(f"a colour mask ({coloured:.0%} of its pixels coloured); {MASK_FORM}")
    grey = np.asarray(Image.fromarray(colour).convert("L"))
    if int(grey.max()) == 0:
        raise _NotGreyMask(f"all background: it marks no cell (never drawn?); {MASK_FORM}")
    if int(grey.max()) < CYTOPLASM_MIN_GREY:
        raise _NotGreyMask(
            f"its values run 0..{int(grey.max())}, all below the cytoplasm's grey (a mask of "
            f"class codes or of 0 and 1?); {MASK_FORM}"
        )
    return grey


def _grey_to_classes(grey: np.ndarray) -> np.ndarray:
    """Threshold a grey mask into BACKGROUND / CYTOPLASM / NUCLEUS codes."""
    codes = np.full(grey.shape, BACKGROUND, np.uint8)
    codes[grey >= CYTOPLASM_MIN_GREY] = CYTOPLASM
    codes[grey >= NUCLEUS_MIN_GREY] = NUCLEUS
    return codes


def _size(array: np.ndarray) -> str:
    """``W x H`` of an image or mask, as image viewers print it."""
    return f"{array.shape[1]}x{array.shape[0]}"


# ---- the synthetic format ----


def _read_synthetic(source: Source) -> ReadResult:
    """Generate a synthetic hospital in memory; bad parameters become bad_config problems."""
    spec = source.spec
    result = ReadResult(source.hospital, source.classes, has_masks=True)
    try:
        domain, count = str(spec["domain"]), int(spec["num_images"])
        size, seed = int(spec["image_size"]), int(spec["seed"])
        if source.keep_arrays:
            result.images, labels, result.masks = generate_hospital(
                domain, count, size, seed, source.classes
            )
        else:
            labels = synthetic_labels(domain, count, size, seed, source.classes)
    except (TypeError, ValueError) as error:
        result.problems.append(source.problem("bad_config", "", str(error)))
        return result
    result.labels = labels.tolist()
    result.sample_ids = [f"synthetic/{i}" for i in range(count)]
    return result


FORMATS: dict[str, Format] = {
    "zxaoyou": Format(_read_files(_list_zxaoyou), ("root", "subset"), ("class_map",)),
    "raabin": Format(_read_files(_list_raabin), ("root",), ("class_map",)),
    "class_folders": Format(
        _read_files(_list_class_folders), ("root",), ("class_map", "extensions", "mask_root")
    ),
    "synthetic": Format(_read_synthetic, ("domain", "num_images", "image_size", "seed")),
}
