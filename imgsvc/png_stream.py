"""PNG encoding: rows fed one band at a time, so a huge image never has to exist uncompressed.

Rows use PNG's "Up" filter (difference to the row above, computed with numpy) and deflate at
level 1 through ISA-L (`isal`) where its wheel is installed, else zlib: several times faster
than Pillow's encoder for the same size (`python bench/png_encode.py`, results in
BENCHMARKS.md). `encode_png` is the whole-image form used by `images.encode`.
"""

from __future__ import annotations

import io
import struct
import types
import zlib
from typing import BinaryIO

import numpy as np

_deflate: types.ModuleType
try:  # ISA-L's deflate: the same zlib stream format, faster at level 1
    from isal import isal_zlib as _deflate
except ImportError:  # pragma: no cover - platforms without an isal wheel
    _deflate = zlib

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (L, LA, RGB, RGBA)
_UP = 2
DEFLATE_BACKEND = "isal" if _deflate is not zlib else "zlib"


class PngStreamWriter:
    """Write an 8-bit PNG of known size to `out` as its rows arrive (a `RowSink`).

    `icc_profile`: an ICC profile to embed (iCCP chunk), e.g. sRGB for marketplaces.
    """

    def __init__(
        self,
        out: BinaryIO,
        width: int,
        height: int,
        channels: int,
        *,
        icc_profile: bytes | None = None,
    ) -> None:
        if channels not in _COLOR_TYPES:
            raise ValueError(f"PNG needs 1 to 4 channels, not {channels}")
        self._out = out
        self._shape = (width, channels)
        self._rows_left = height
        self._zip = _deflate.compressobj(1)
        self._previous = np.zeros(width * channels, dtype=np.uint8)
        header = struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPES[channels], 0, 0, 0)
        out.write(_SIGNATURE)
        self._chunk(b"IHDR", header)
        if icc_profile is not None:  # name, NUL, compression method 0, zlib data
            self._chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile))

    def _chunk(self, kind: bytes, data: bytes) -> None:
        crc = zlib.crc32(data, zlib.crc32(kind))
        self._out.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc))

    def write(self, rows: np.ndarray) -> None:
        width, channels = self._shape
        if rows.dtype != np.uint8 or rows.shape[1:] != (width, channels):
            raise ValueError(f"expected uint8 rows of shape (n, {width}, {channels})")
        if rows.shape[0] > self._rows_left:
            raise ValueError("more rows than the PNG header announced")
        flat = rows.reshape(rows.shape[0], -1)
        above = np.concatenate([self._previous[None], flat[:-1]])
        filtered = np.empty((flat.shape[0], flat.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = _UP
        np.subtract(flat, above, out=filtered[:, 1:])  # wraps modulo 256, as PNG wants
        data = self._zip.compress(filtered.tobytes())
        if data:
            self._chunk(b"IDAT", data)
        self._previous = flat[-1].copy()
        self._rows_left -= rows.shape[0]

    def close(self) -> None:
        """Finish the file; every announced row must have been written."""
        if self._rows_left:
            raise ValueError(f"{self._rows_left} rows were never written")
        self._chunk(b"IDAT", self._zip.flush())
        self._chunk(b"IEND", b"")


def encode_png(pixels: np.ndarray, *, icc_profile: bytes | None = None) -> bytes:
    """A whole uint8 image (H x W, or H x W x 1|3|4) → PNG bytes."""
    rows = pixels[:, :, None] if pixels.ndim == 2 else pixels
    height, width, channels = rows.shape
    buf = io.BytesIO()
    writer = PngStreamWriter(buf, width, height, channels, icc_profile=icc_profile)
    writer.write(rows)
    writer.close()
    return buf.getvalue()
