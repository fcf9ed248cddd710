"""Seed inputs, made by code: tiny valid images of every accepted kind, masks and zips."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable

from PIL import Image

SIZE = (16, 12)


def _image(mode: str, fmt: str, **save: object) -> bytes:
    color = 128 if mode in ("L", "P", "I;16") else (200, 30, 90, 128)[: len(mode)]
    img = Image.new(mode, SIZE, color)
    if mode == "P":
        img.putpalette([i % 256 for i in range(768)])
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def images() -> list[bytes]:
    """PNG (RGB, RGBA, L, palette with transparency, 16-bit), JPEG, GIF, WebP, TIFF, BMP."""
    return [
        _image("RGB", "PNG"),
        _image("RGBA", "PNG"),
        _image("L", "PNG"),
        _image("P", "PNG", transparency=0),
        _image("I;16", "PNG"),
        _image("RGB", "JPEG", quality=80),
        _image("L", "JPEG"),
        _image("RGB", "GIF"),
        _image("RGBA", "WEBP", quality=80),
        _image("RGB", "WEBP", lossless=True),
        _image("RGB", "TIFF"),
        _image("CMYK", "TIFF"),
        _image("RGB", "BMP"),
    ]


def masks() -> list[bytes]:
    """Masks the size of the fuzzed image: grey, black and white, with alpha."""
    white_box = Image.new("L", SIZE, 0)
    white_box.paste(255, (4, 4, 9, 9))
    out = []
    for img, fmt in ((white_box, "PNG"), (white_box.convert("RGBA"), "PNG"), (white_box, "JPEG")):
        buf = io.BytesIO()
        img.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _zip(members: dict[str, bytes], method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zips() -> list[bytes]:
    """Stored, deflated, bzip2 and LZMA zips of images in folders, and an empty one."""
    png, jpeg = images()[0], images()[5]
    members = {"a.png": png, "shop/b.jpg": jpeg, "shop/": b"", "__MACOSX/._a.png": b"x"}
    return [
        _zip(members, zipfile.ZIP_STORED),
        _zip(members, zipfile.ZIP_DEFLATED),
        _zip({"c.png": png}, zipfile.ZIP_BZIP2),
        _zip({"d.png": png}, zipfile.ZIP_LZMA),
        _zip({}, zipfile.ZIP_STORED),
    ]


def boxes() -> list[bytes]:
    """`mask_boxes` texts: both accepted shapes."""
    return [
        b"[[1, 2, 3, 4]]",
        b'[{"x": 0, "y": 0, "width": 16, "height": 12}, [5, 5, 2, 2]]',
    ]


SEEDS: dict[str, Callable[[], list[bytes]]] = {
    "decode": images,
    "mask": masks,
    "zip": zips,
    "mask_boxes": boxes,
}
