"""Tile geometry and a streaming feathered blender for fixed-scale image models.

The input is cut into a grid of roughly equal tiles (each at most `tile` pixels a side). Each
tile is run with `context` extra input pixels on every side, which are thrown away afterwards;
neighbouring tiles then overlap by `2 * blend` input pixels, where their outputs are mixed with
complementary linear ramps. The ramps of all tiles sum to exactly 1 everywhere (a partition of
unity), so no weight map is needed and there is no visible seam.

Output rows are handed to a `RowSink` as soon as no later tile can touch them, so memory is one
band of tiles (band height x output width), never the whole output image. The band is summed in
uint16 fixed point (1/256 of a level), half the memory of float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class RowSink(Protocol):
    """Receives the finished output, top to bottom, as uint8 arrays of shape (rows, W, C)."""

    def write(self, rows: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Span:
    """One tile along an axis: `start:stop` is its own part, `lo:hi` the part run (with context)."""

    start: int
    stop: int
    lo: int
    hi: int


def spans(length: int, tile: int, context: int, blend: int) -> list[Span]:
    """Split `length` into near-equal tiles of at most `tile` (each at least 2 * blend long)."""
    count = max(1, -(-length // tile))
    while count > 1 and length // count < 2 * blend:
        count -= 1
    cuts = [round(i * length / count) for i in range(count + 1)]
    return [
        Span(a, b, max(0, a - context), min(length, b + context))
        for a, b in itertools.pairwise(cuts)
    ]


def _ramp(sp: Span, length: int, blend: int, scale: int) -> tuple[int, int, np.ndarray]:
    """Output range a tile contributes to and its weights there (1-D, float32)."""
    first, last = sp.start == 0, sp.stop == length
    lo = sp.start if first else sp.start - blend
    hi = sp.stop if last else sp.stop + blend
    weights = np.ones((hi - lo) * scale, dtype=np.float32)
    width = 2 * blend * scale
    ramp = (np.arange(width, dtype=np.float32) + 0.5) / width
    if not first:
        weights[:width] = ramp
    if not last:
        weights[-width:] = ramp[::-1]
    return lo * scale, hi * scale, weights


@dataclass(frozen=True)
class TileJob:
    """One tile to run: the input window and where its output lands."""

    y: Span
    x: Span


def tile_jobs(height: int, width: int, tile: int, context: int, blend: int) -> list[TileJob]:
    """Tiles in raster order (row by row), which is what `FeatherBlender` expects."""
    xs = spans(width, tile, context, blend)
    return [TileJob(y, x) for y in spans(height, tile, context, blend) for x in xs]


class FeatherBlender:
    """Accumulates tile outputs of one band and streams finished rows to a sink."""

    _CHUNK = 64  # rows converted to uint8 and sent at a time (bounds the temporaries)

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        *,
        scale: int,
        blend: int,
        sink: RowSink,
    ) -> None:
        self._h, self._w, self._c = height, width, channels
        self._s, self._b = scale, blend
        self._sink = sink
        self._top = 0  # output row held in self._band[0], the first not yet sent
        self._band = np.zeros((0, width * scale, channels), dtype=np.uint16)

    def add(self, job: TileJob, out: np.ndarray) -> None:
        """`out`: float32 (rows, cols, C) in [0, 255], the model's output for `job.y.lo:hi`."""
        s = self._s
        y0, y1, wy = _ramp(job.y, self._h, self._b, s)
        x0, x1, wx = _ramp(job.x, self._w, self._b, s)
        oy, ox = y0 - job.y.lo * s, x0 - job.x.lo * s
        part = out[oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
        part *= wy[:, None, None] * 256.0
        part *= wx[None, :, None]
        np.rint(part, out=part)  # weights sum to 1: at most 255 * 256 + 2 per pixel
        self._band[y0 - self._top : y1 - self._top, x0:x1] += part.astype(np.uint16)

    def flush_until(self, row: int) -> None:
        """Send output rows above `row` (no later tile reaches them) to the sink."""
        n = row - self._top
        if n <= 0:
            return
        for i in range(0, n, self._CHUNK):
            chunk = self._band[i : min(n, i + self._CHUNK)]
            chunk += 128
            chunk >>= 8
            self._sink.write(chunk.astype(np.uint8))
        kept = self._band.shape[0] - n
        if kept > 0:  # move the rows still blending to the top, in place
            self._band[:kept] = self._band[n:]
        self._band[max(kept, 0) :] = 0
        self._top = row

    def run(self, jobs: list[TileJob], forward: Callable[[TileJob], np.ndarray]) -> None:
        """Run every tile through `forward` and stream the whole output to the sink."""
        tallest = max(j.y.stop - j.y.start + 2 * self._b for j in jobs) * self._s
        self._band = np.zeros((tallest, self._w * self._s, self._c), dtype=np.uint16)
        current: Span | None = None
        for job in jobs:
            if current is not None and job.y != current:
                # rows above the next band's blend zone are final
                self.flush_until((job.y.start - self._b) * self._s)
            current = job.y
            self.add(job, forward(job))
        self.flush_until(self._h * self._s)


class ArraySink:
    """Collects the rows into one in-memory uint8 array (H, W, C)."""

    def __init__(self, height: int, width: int, channels: int) -> None:
        self.array = np.empty((height, width, channels), dtype=np.uint8)
        self._row = 0

    def write(self, rows: np.ndarray) -> None:
        self.array[self._row : self._row + rows.shape[0]] = rows
        self._row += rows.shape[0]
