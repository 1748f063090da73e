"""Files written with ``torch.save``, read back safely: one line naming the file when they fail.

Below the model code, so that the model's DeiT starting weights are read as the model files are.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from common.errors import JobError


class CheckpointError(JobError):
    """A model file that is missing, unreadable or does not fit: one line naming the file.

    Raised for the MCT model file (``checkpoint=``) and the segmenter file (``segmenter=``)
    alike; commands show it as one line and exit with status 2.
    """


# Of a message torch gives for a damaged file, at most this much of its first line is shown.
MAX_DETAIL = 160
# How a torch.save file begins: a zip archive, or (before torch 1.6) a pickle stream.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, shortened: torch's advice runs to paragraphs."""
    lines = str(error).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    text = text or type(error).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def read_torch_file(path: str | Path, key: str) -> Any:
    """What a file written with ``torch.save`` holds, or a one-line :class:`CheckpointError`.

    Only tensors and plain values are loaded (``weights_only``); a file holding pickled
    objects is refused unread.

    Parameters
    ----------
    path
        The file.
    key
        The config key that named it (``checkpoint``, ``segmenter``), for the message.
    """
    path = Path(path)
    where = f"{key}={path}"
    if not path.exists():
        raise CheckpointError(f"{where}: file not found")
    if not path.is_file():
        raise CheckpointError(f"{where} is not a file")
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(len(ZIP_MAGIC))
    except OSError as error:
        raise CheckpointError(f"{where} cannot be read: {first_line(error)}") from None
    if size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): a copy or a save that did not finish")
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise CheckpointError(
            f"{where} is not a PyTorch file: torch.save writes a zip archive, this file begins "
            f"{head!r} (a web page, an image or a text saved under the name?)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower():
            raise CheckpointError(
                f"{where} holds pickled Python objects, not only tensors and plain values: "
                "not a file this project wrote (refused unread, for safety)"
            ) from None
        raise CheckpointError(f"{where} is unreadable: {first_line(error)}") from None
    except OSError as error:
        raise CheckpointError(f"{where} cannot be read: {first_line(error)}") from None
    except Exception as error:  # torch raises several types for a damaged or foreign file
        if "central directory" in str(error) or isinstance(error, EOFError):
            raise CheckpointError(
                f"{where} is truncated or not a PyTorch file ({size} bytes that torch.load "
                "cannot read to the end)"
            ) from None
        raise CheckpointError(f"{where} is unreadable: {first_line(error)}") from None
