"""Image files that Pillow cannot write, built byte by byte for the readers' tests."""

import struct
import zlib
from pathlib import Path

import numpy as np


def write_rgb48_png(path: Path, values: np.ndarray) -> None:
    """A PNG of 16 bits per channel (RGB, or RGBA for 4 channels): Pillow saves no such file."""
    height, width, channels = values.shape
    rows = values.astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    colour_type = {3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def write_rgb565_bmp(path: Path, values: np.ndarray) -> None:
    """A BMP of 16 bits a pixel in 5-6-5 bit fields, ``values`` (H, W) the packed pixels."""
    height, width = values.shape
    row_bytes = (2 * width + 3) // 4 * 4
    rows = b"".join(
        values[y].astype("<u2").tobytes().ljust(row_bytes, b"\x00") for y in reversed(range(height))
    )
    offset = 14 + 40 + 12
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 16, 3, len(rows), 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    header = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    path.write_bytes(header + info + masks + rows)
