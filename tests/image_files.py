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


def write_rgb_tiff(path: Path, values: np.ndarray, *, planar: bool) -> None:
    """An uncompressed RGB TIFF of ``values`` (H, W, 3; uint8 or uint16), big-endian.

    Pillow saves no 16-bit RGB TIFF. ``planar``: one strip per colour (PlanarConfiguration 2);
    else one interleaved strip.
    """
    height, width, _ = values.shape
    sample = values.dtype.newbyteorder(">")
    strips = (
        [values[..., c].astype(sample).tobytes() for c in range(3)]
        if planar
        else [values.astype(sample).tobytes()]
    )
    bits = 8 * values.dtype.itemsize
    entries = 11
    arrays_at = 8 + 2 + 12 * entries + 4  # after the header and the one directory
    offsets_at, counts_at = arrays_at + 6, arrays_at + 6 + 4 * len(strips)
    data_at = counts_at + 4 * len(strips)
    starts = [data_at + sum(len(s) for s in strips[:i]) for i in range(len(strips))]

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        packed = (
            struct.pack(">HH", value, 0) if kind == 3 and count == 1 else struct.pack(">I", value)
        )
        return struct.pack(">HHI", tag, kind, count) + packed

    one_strip = len(strips) == 1
    directory = [
        entry(256, 3, 1, width),
        entry(257, 3, 1, height),
        entry(258, 3, 3, arrays_at),  # BitsPerSample, one per colour
        entry(259, 3, 1, 1),  # no compression
        entry(262, 3, 1, 2),  # RGB
        entry(273, 4, len(strips), starts[0] if one_strip else offsets_at),
        entry(277, 3, 1, 3),
        entry(278, 3, 1, height),
        entry(279, 4, len(strips), len(strips[0]) if one_strip else counts_at),
        entry(284, 3, 1, 2 if planar else 1),
        entry(339, 3, 1, 1),  # unsigned integers
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"MM\x00\x2a"
        + struct.pack(">IH", 8, entries)
        + b"".join(directory)
        + struct.pack(">I", 0)
        + struct.pack(">HHH", bits, bits, bits)
        + struct.pack(f">{len(strips)}I", *starts)
        + struct.pack(f">{len(strips)}I", *(len(s) for s in strips))
        + b"".join(strips)
    )
