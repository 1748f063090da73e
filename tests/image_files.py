"""Image files that Pillow cannot write, built byte by byte for the readers' tests."""

import struct
import zlib
from pathlib import Path

import numpy as np


def write_rgb48_png(path: Path, values: np.ndarray) -> None:
    """A PNG of 16 bits per colour channel, written by hand: Pillow saves no such file."""
    height, width, _ = values.shape
    rows = values.astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
