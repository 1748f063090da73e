"""``w3s-predict``: segment new images with a segmenter trained by ``w3s-postprocess``.

Every visible file directly in ``input`` is tried. Each is written as ``output/<file name>.png``,
a label map (0 background, k = class k), and ``output/overlays/<file name>.png``: the whole
input name is kept (``a.bmp`` -> ``a.bmp.png``), so two inputs never share an output file.

Nothing is destroyed: an ``output`` that is ``input``, lies inside it or contains it is
refused, and so is one that already holds a file this run would write, unless
``overwrite=true``. With it, ``output`` keeps this run's masks and overlays only: an earlier
run's that this run does not write again (of images since gone, maybe of other classes than
``classes.json`` now says) are removed, and nothing else: each run records its outputs in
``.w3s-predict-outputs.json``. ``output`` is created and a probe file written and removed
before any image is read, so an unwritable folder stops the job at once.

Images are decoded, segmented and written a few at a time (``batch_size`` images, at most 16M
decoded pixels). The segmenter sees every image at its input size (128 px by default) and its
logits are upsampled back to the image a strip of rows at a time, so the full-size logits never
exist: memory is about 12 bytes per pixel of the largest image (image, label map, overlay). An
image with a side longer than ``max_side`` px is skipped, read from its header before it is
decoded: it is no single-cell crop (the segmenter would stretch a 128 px guess over it) and
refusing it bounds the memory (about 0.8 GB at 8192 x 8192).

Exit status: 0 every file was segmented and written; 1 some input files were skipped (each is
named in the log: undecodable, larger than max_side or not written), the others were written;
2 nothing ran (a bad command line, a missing or unreadable segmenter file, a missing or empty
input folder, an input name too long for its output names, an output folder that is
unwritable, overlaps input or holds earlier outputs, a device the machine lacks); 70 an
unexpected error, printed with its traceback.

The key ``segmenter`` names a file here, while ``w3s-postprocess`` uses a config group of that
name, so this command's config lives in Hydra's config store instead of ``conf/``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from common.cli import Command
from common.errors import JobError
from common.files import longest_replaceable_name, write_text_atomically
from common.imaging import load_checked, open_from_memory
from common.progress import Progress
from common.segmenter import Decoding, load_segmenter, predict
from common.training import check_device, resolve_device
from post_training.artifacts import class_colours, rgb_array, save_label_png, save_overlay

# Named, not __name__: run as ``python -m post_training.predict`` the module is __main__, whose
# logger has no handler, and the names of skipped files must reach the log.
log = logging.getLogger("post_training.predict")
USAGE = "w3s-predict segmenter=<out>/segmenter.pt input=<folder> output=<folder>"
# Decoded pixels held at once by a batch of small images (a larger image is a batch alone).
BATCH_PIXELS = 1 << 24
OVERLAYS = "overlays"
# What each value of the masks means and its colour in the overlays, beside the masks.
LEGEND = "classes.json"
# Every mask and overlay the runs into a folder wrote, so that ``overwrite=true`` removes an
# earlier run's outputs it does not replace, and never a file of the user's.
RECORD = ".w3s-predict-outputs.json"

ConfigStore.instance().store(
    name="w3s_predict",
    node={
        "segmenter": "???",
        "input": "???",
        "output": "???",
        "device": "auto",
        "batch_size": 16,
        "overlays": True,
        "overwrite": False,
        "max_side": 8192,
    },
)


def list_inputs(folder: Path) -> list[Path]:
    """Visible files directly in ``folder``, sorted; a clear error if it is missing.

    A link to nothing (a share not mounted) is listed too: reading it fails by name and the
    status says files were skipped, where passing over it would say every file was segmented.
    """
    if not folder.is_dir():
        raise JobError(f"input={folder}: folder not found")
    files = sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() or (p.is_symlink() and not p.exists())) and not p.name.startswith(".")
    )
    if not files:
        raise JobError(f"input={folder}: no files to segment")
    return files


def output_names(paths: Sequence[Path]) -> list[str]:
    """Output file names: the whole input name plus ``.png`` (``a.bmp`` -> ``a.bmp.png``).

    The names of files in one folder differ, so their outputs do too, whatever the names are.
    """
    return [f"{path.name}.png" for path in paths]


def check_folders(source: Path, out: Path) -> None:
    """Refuse an output folder that is the input folder, lies inside it or contains it."""
    if out == source:
        raise JobError(f"output={out} is the input folder; choose a separate folder")
    if out.is_relative_to(source):
        raise JobError(f"output={out} lies inside input={source}; choose a separate folder")
    if source.is_relative_to(out):
        raise JobError(f"output={out} contains input={source}; choose a separate folder")


def planned_files(out: Path, names: Sequence[str], overlays: bool) -> list[Path]:
    """Every file this run writes."""
    files = [out / name for name in names]
    if overlays:
        files += [out / OVERLAYS / name for name in names]
    return files


def check_name_lengths(
    out: Path, paths: Sequence[Path], names: Sequence[str], overlays: bool
) -> None:
    """Refuse input files whose output names ``output`` cannot hold, before any file is written.

    An output name adds ``.png`` to a name the input folder holds, and it is written through a
    longer temporary name: near the file system's limit (255 bytes) the input name is legal
    where its outputs are not, and the run would stop at them with some files written.
    """
    folders = [out, out / OVERLAYS] if overlays else [out]
    longest = min(longest_replaceable_name(folder) for folder in folders)
    too_long = [
        path.name
        for path, name in zip(paths, names, strict=True)
        if len(os.fsencode(name)) > longest
    ]
    if too_long:
        raise JobError(
            f"input={paths[0].parent}: the output names of {len(too_long)} file(s) would be "
            f"longer than the {longest} bytes a file written in output={out} may have; rename "
            f"them: {', '.join(too_long)}"
        )


def check_no_overwrite(out: Path, files: Sequence[Path]) -> None:
    """Refuse to replace files that exist already (``overwrite=true`` allows it)."""
    existing = [path for path in files if path.exists() or path.is_symlink()]
    if existing:
        raise JobError(
            f"output={out} already holds {len(existing)} of the {len(files)} files this run "
            f"would write (first: {existing[0].relative_to(out)}); choose another folder or "
            "pass overwrite=true to replace them"
        )


def earlier_outputs(out: Path) -> list[Path]:
    """The masks and overlays that earlier runs recorded writing in ``out`` (none unrecorded).

    Only a ``.png`` in ``out`` or its overlays folder counts: a record that was edited or
    damaged never names another file to remove.
    """
    try:
        recorded = json.loads((out / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or unreadable: nothing is known to be this tool's
        return []
    if not isinstance(recorded, list):
        return []
    paths = [out / name for name in recorded if isinstance(name, str)]
    return [p for p in paths if p.parent in (out, out / OVERLAYS) and p.suffix == ".png"]


def record_text(out: Path, files: Sequence[Path]) -> str:
    """The record of ``files``, each relative to ``out`` (see earlier_outputs)."""
    return json.dumps(sorted({path.relative_to(out).as_posix() for path in files})) + "\n"


def legend_text(classes: Sequence[str]) -> str:
    """``classes.json``: each mask value's class, and each class's colour in the overlays."""
    legend = {
        "mask values": {"0": "background", **{str(k + 1): c for k, c in enumerate(classes)}},
        "overlay colours": {name: list(rgb) for name, rgb in class_colours(classes).items()},
    }
    return json.dumps(legend, indent=2) + "\n"


def check_legend(out: Path, text: str) -> None:
    """Refuse to add masks of other classes beside earlier ones (``overwrite=true`` allows it)."""
    path = out / LEGEND
    if not (path.exists() or path.is_symlink()):
        return
    try:
        same = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        raise JobError(
            f"output={out} holds masks of another class list ({LEGEND} differs); choose another "
            "folder or pass overwrite=true to replace it"
        )


def prepare_output(out: Path, overlays: bool) -> None:
    """Create the output folders and prove them writable with a probe file, or a JobError."""
    folders = [out, out / OVERLAYS] if overlays else [out]
    for folder in folders:
        if folder.exists() and not folder.is_dir():
            raise JobError(f"output={out}: {folder} exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".w3s-predict-probe-")
            try:
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(b"w3s-predict write probe\n")
            finally:
                Path(probe).unlink(missing_ok=True)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise JobError(f"output={out} is not writable: {reason} ({folder})") from None


def read_input(path: Path, max_side: int) -> np.ndarray | None:
    """Decode one file to HxWx3 uint8 RGB, or log why it is skipped and return ``None``.

    The size comes from the header first: a file over ``max_side`` is never decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if max(width, height) > max_side:
                    log.error(
                        "skipping %s: %d x %d px is larger than max_side=%d",
                        path,
                        width,
                        height,
                        max_side,
                    )
                    return None
            with open_from_memory(path) as image:
                return rgb_array(load_checked(image))
    # PIL reports corrupt data with many exception types; any makes the file unusable.
    except Exception as error:
        log.error(
            "skipping %s: cannot decode it as an image (%s: %s)",
            path,
            type(error).__name__,
            error,
        )
        return None


def check_predict_config(cfg: DictConfig) -> None:
    """Refuse a missing key or a value of the wrong kind before any work starts."""
    missing = [key for key in ("segmenter", "input", "output") if OmegaConf.is_missing(cfg, key)]
    if missing:
        raise JobError(f"{', '.join(f'{key}=...' for key in missing)} required: " + USAGE)
    for key in ("batch_size", "max_side"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JobError(f"{key}={value} must be a whole number >= 1")
    for key in ("overlays", "overwrite"):
        if not isinstance(cfg[key], bool):
            raise JobError(f"{key}={cfg[key]} must be true or false")
    check_device(cfg)


class _Writer:
    """Segments the decoded images of one batch and writes their files; counts what failed."""

    def __init__(
        self,
        cfg: DictConfig,
        model: tuple[torch.nn.Module, dict[str, Any], list[str]],
        out: Path,
        total: int,
    ) -> None:
        self.model, self.seg_cfg, self.classes = model
        self.out = out
        self.overlays = bool(cfg.overlays)
        self.overwrite = bool(cfg.overwrite)
        self.device = resolve_device(str(cfg.device))
        self.progress = Progress("segmenter predictions", total, log)
        self.written = 0
        self.failed: list[Path] = []

    def __call__(self, batch: Sequence[tuple[Path, str, np.ndarray]]) -> None:
        if not batch:
            return
        images = [image for _, _, image in batch]
        labels = predict(
            self.model,
            images,
            int(self.seg_cfg["input_size"]),
            device=self.device,
            batch_size=len(images),
            progress=self.progress,
            decoding=Decoding.of(self.seg_cfg),
        )
        for (path, name, image), label_map in zip(batch, labels, strict=True):
            mask, overlay = self.outputs(name)
            written: list[Path] = []
            try:
                save_label_png(mask, label_map)
                written.append(mask)
                if self.overlays:
                    save_overlay(overlay, image, label_map)
                    written.append(overlay)
            except OSError as error:
                log.error("skipping %s: cannot write its outputs (%s)", path, error)
                for partial in written:  # a skipped file has no outputs of this run
                    partial.unlink()
                self.skip(path, [mask, overlay])
                continue
            self.remove_earlier([mask, overlay][len(written) :], f"written for {path}")
            self.written += 1

    def outputs(self, name: str) -> tuple[Path, Path]:
        """The files a run may hold for the input file ``name``: its mask and its overlay."""
        return self.out / name, self.out / OVERLAYS / name

    def skip(self, path: Path, unwritten: Sequence[Path]) -> None:
        """Count ``path`` as skipped; an earlier run's files for it go (see remove_earlier)."""
        self.failed.append(path)
        self.remove_earlier(unwritten, f"written for {path}")

    def remove_earlier(self, unwritten: Sequence[Path], what: str) -> None:
        """Remove files an earlier run wrote that this run did not replace; ``what`` is logged.

        Only with ``overwrite=true``; without it they are refused before any work, or are the
        user's to keep. There, an earlier mask of an image that has since changed or cannot be
        read, the overlay of an earlier mask (a rerun with ``overlays=false``), or the mask of
        an image not in this run, made by a segmenter of other classes than ``classes.json``
        now names, would pass for this run's.
        """
        if not self.overwrite:
            return
        for earlier in unwritten:
            if earlier.exists():
                earlier.unlink()
                log.warning("removed %s: %s by an earlier run", earlier, what)


def run_predict(cfg: DictConfig) -> int:
    """Segment the input folder; return the exit status (0 all written, 1 some files skipped).

    Raises
    ------
    JobError
        Before any image is read, for what stops the whole job (exit status 2).
    """
    check_predict_config(cfg)
    source = Path(str(cfg.input)).expanduser().resolve()
    out = Path(str(cfg.output)).expanduser().resolve()
    model = load_segmenter(Path(str(cfg.segmenter)).expanduser().resolve())
    check_folders(source, out)
    overlays = (out / OVERLAYS).resolve()  # a link into the input folder is refused too
    if cfg.overlays and (overlays.is_relative_to(source) or source.is_relative_to(overlays)):
        raise JobError(
            f"output={out}: its overlays folder leads to {overlays}, which overlaps input={source}"
        )
    paths = list_inputs(source)
    names = output_names(paths)
    check_name_lengths(out, paths, names, bool(cfg.overlays))
    writer = _Writer(cfg, model, out, len(paths))
    legend = legend_text(writer.classes)
    planned = planned_files(out, names, bool(cfg.overlays))
    if not cfg.overwrite:
        check_no_overwrite(out, planned)
        check_legend(out, legend)
    prepare_output(out, bool(cfg.overlays))
    earlier = earlier_outputs(out)
    if cfg.overwrite:  # this run's outputs replace all earlier ones
        gone = sorted(set(earlier) - set(planned))
        writer.remove_earlier(gone, "written for a file not in this run")
        earlier = []
    write_text_atomically(out / RECORD, record_text(out, [*earlier, *planned]))
    write_text_atomically(out / LEGEND, legend)
    log.info(
        "segmenting %d files with %s (classes %s) into %s",
        len(paths),
        writer.seg_cfg["arch"],
        writer.classes,
        out,
    )
    max_side = int(cfg.max_side)
    batch: list[tuple[Path, str, np.ndarray]] = []
    pixels = 0
    for path, name in zip(paths, names, strict=True):
        image = read_input(path, max_side)
        if image is None:
            writer.skip(path, writer.outputs(name))
            writer.progress.update()
            continue
        batch.append((path, name, image))
        pixels += image.shape[0] * image.shape[1]
        if len(batch) >= int(cfg.batch_size) or pixels >= BATCH_PIXELS:
            writer(batch)
            batch, pixels = [], 0
    writer(batch)
    log.info("wrote %d of %d masks to %s", writer.written, len(paths), out)
    if writer.failed:
        names = ", ".join(path.name for path in sorted(writer.failed))
        log.error("%d file(s) skipped: %s", len(writer.failed), names)
        return 1
    return 0


COMMAND = Command(
    name="w3s-predict",
    summary=__doc__,
    config="w3s_predict",
    job=lambda cfg, _: run_predict(cfg),
    keys={
        "segmenter": "segmenter.pt written by w3s-postprocess (required)",
        "input": "folder of images to segment (required)",
        "output": "folder for the label maps and overlays, apart from input (required)",
        "device": "auto (CUDA when present), cpu or cuda",
        "batch_size": "images per forward pass",
        "overlays": "also write colour overlays (true/false)",
        "overwrite": "replace an earlier run's outputs, remove the rest (default false: refuse)",
        "max_side": "longest image side in px; larger images are skipped (default 8192)",
    },
    examples=["w3s-predict segmenter=<out>/segmenter.pt input=new_images output=masks"],
    check=check_predict_config,
    own_store=True,
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-predict``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
