"""PNG encoding of real cut-outs, side by side in one run: `images.encode` (Up filter + deflate
level 1 through ISA-L, or zlib where isal is missing) vs Pillow at compress_level=1 and at its
default level 6 (what rembg's server uses).

Input: the 20 photos of bench/remove_background.py at 1024 px, cut out with u2netp (RGBA, the
background fully transparent and cleared), as the remove-background endpoint encodes them.

    python bench/png_encode.py
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.remove_background import WEIGHTS, photos
from imgsvc import images
from imgsvc.models.background.remover import BackgroundRemover
from imgsvc.operations.cutout.pipeline import remove_background
from imgsvc.operations.cutout.spec import CutoutSpec
from imgsvc.png_stream import DEFLATE_BACKEND


def pillow(level: int) -> Callable[[Image.Image], bytes]:
    def encode(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=level)
        return buf.getvalue()

    return encode


def measure(
    encode: Callable[[Image.Image], bytes], cutouts: list[Image.Image]
) -> tuple[float, int]:
    """Median ms per image over 3 passes, and the mean size in bytes."""
    encode(cutouts[0])
    passes = []
    for _ in range(3):
        started = time.perf_counter()
        size = sum(len(encode(img)) for img in cutouts)
        passes.append((time.perf_counter() - started) / len(cutouts) * 1000)
    return sorted(passes)[1], size // len(cutouts)


def main() -> int:
    engine = BackgroundRemover(
        "u2netp",
        WEIGHTS / "rembg" / "u2netp.onnx",
        device="cpu",
        strict=False,
        threads=os.cpu_count() or 1,
    )
    cutouts = []
    for data in photos(1024, 20):
        body = remove_background(
            engine, Image.open(io.BytesIO(data)).convert("RGB"), CutoutSpec()
        ).body
        cutouts.append(Image.open(io.BytesIO(body)).convert("RGBA"))
    ours, ours_size = measure(lambda img: images.encode(img, "png"), cutouts)
    print(f"20 RGBA cut-outs at 1024 px; imgsvc deflate backend: {DEFLATE_BACKEND}")
    print("| encoder | ms per image | KiB per image | imgsvc speed-up |")
    print("|---|---|---|---|")
    print(f"| imgsvc `images.encode` | {ours:.1f} | {ours_size / 1024:.0f} | 1.00 |")
    for level in (1, 6):
        ms, size = measure(pillow(level), cutouts)
        print(f"| Pillow compress_level={level} | {ms:.1f} | {size / 1024:.0f} | {ms / ours:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
