"""Files, and sets of a job's outputs, that appear whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_TEMPORARY = ".tmp"
# What the name of replaced_atomically's temporary file adds to the name it replaces: "." before
# it; ".", mkstemp's 8 random characters and _TEMPORARY after it.
_TEMPORARY_EXTRA = 1 + 1 + 8 + len(_TEMPORARY)
# The usual longest file name in bytes (Linux, macOS, Windows), for a file system that won't say.
_NAME_MAX = 255


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` once the block succeeds.

    A crash or an error mid-write leaves the old file (or none) and no half-written one, so
    readers that test for the file (a resumed experiment, a loaded model) never see a torso.
    The rename stays on one file system because the temporary file sits in the same folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY)
    os.close(handle)
    temporary = Path(name)
    # mkstemp makes the file its owner's alone (0600); the result should be readable as any
    # other file its folder gets (masks read on the host, models shared by a team): the
    # process's umask decides, as it does for a plain open().
    temporary.chmod(0o666 & ~_umask())
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def longest_replaceable_name(folder: Path) -> int:
    """The longest file name, in bytes, that :func:`replaced_atomically` can write in ``folder``.

    Its temporary file's name is longer than the file's, so a name the file system takes can
    still fail there: a job that writes many files checks their names against this up front
    rather than failing after some were written. A folder not made yet is asked of the nearest
    folder above it, the file system it would be made on.
    """
    existing = next(path for path in (folder, *folder.parents) if path.is_dir())
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")  # -1: no limit given
    except (AttributeError, OSError):  # no pathconf (Windows), or the file system does not say
        limit = -1
    return (limit if limit > 0 else _NAME_MAX) - _TEMPORARY_EXTRA


@contextmanager
def synced_replacement(path: Path, binary: bool = False) -> Iterator[IO[Any]]:
    """An open file whose contents replace ``path`` once the block succeeds, on disk first.

    For files a later run reads back (models, a resumed run's ledger and rows): the contents
    reach the disk before the rename, or a power loss could keep the rename and not the
    contents: an empty file in place of the old one.
    """
    with replaced_atomically(path) as temporary:
        encoding = None if binary else "utf-8"
        with temporary.open("wb" if binary else "w", encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole, or what it held before: never a file cut short.

    ``write_text`` empties the file first, so a kill or a full disk in between would leave
    nothing to resume from.
    """
    with synced_replacement(path) as handle:
        handle.write(text)


def read_json(path: Path) -> Any:
    """The JSON value ``path`` holds; one that does not parse is refused in a line naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); it was written by this run, so "
            "it was damaged or edited since"
        ) from None


@contextmanager
def staged_outputs(out: Path, owned: Collection[str]) -> Iterator[Path]:
    """A fresh folder in ``out`` for a job's outputs; they replace ``out``'s own at the end.

    A job that fails or is stopped leaves ``out`` as the last complete run left it, not half
    replaced, and a rerun's outputs never mix with an earlier run's (files of images no longer
    in the split, overlays a rerun did not make). ``owned`` names the entries the job may
    write: at the end the earlier run's go, written again or not, and what the job wrote
    takes their place; other entries of ``out`` stay. Each moves by a rename within ``out``,
    so one file system even where ``out`` is a mount point (a container's output volume).
    """
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        yield staging
        earlier = Path(tempfile.mkdtemp(dir=out, prefix=".replaced-"))
        for name in sorted({*owned, *(entry.name for entry in staging.iterdir())}):
            if (out / name).exists() or (out / name).is_symlink():
                (out / name).rename(earlier / name)
            if (staging / name).exists():
                (staging / name).rename(out / name)
        shutil.rmtree(earlier)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """The process's file-creation mask; reading it means setting it, so it is set back at once.

    On Linux, ``/proc/self/status`` has it without the brief change (which another thread could
    see), so that is read first.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
