"""Marketplace presets and the compliance check behind `X-Compliance`.

A preset sets the layout (canvas, background, fill, centring, format); `check` then reads the
*encoded* result back, as the marketplace would, and tests it against the preset's rules.
Each rule's source is in README.md ("Marketplace presets").
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageCms

from imgsvc.errors import InvalidInput
from imgsvc.operations.cutout.options import RGBA

PresetName = Literal["amazon", "etsy", "ebay", "shopify", "square"]
WHITE: RGBA = (255, 255, 255, 255)
# JPEG blocks next to the subject ring a little; background is judged this far from it.
EDGE_GUARD_PX = 16
CENTRE_TOLERANCE = 0.02  # subject centre within 2 % of the canvas size from the middle


@dataclass(frozen=True)
class Preset:
    name: PresetName
    canvas: tuple[int, int]
    background: RGBA | None  # None = transparent
    fill: float  # default `scale`: the subject's share of the canvas
    format: Literal["jpg", "png"]
    # -- rules checked --
    formats: frozenset[str]  # accepted file formats (Pillow names)
    min_long_side: int = 0
    min_short_side: int = 0
    aspect: tuple[int, int] | None = None  # required width:height
    min_fill: float | None = None  # subject's longer relative side / canvas
    max_pixels: int | None = None
    max_bytes: int | None = None
    require_srgb: bool = False
    centred: bool = True


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "amazon",
            (2000, 2000),
            WHITE,
            0.9,
            "jpg",
            frozenset({"JPEG", "TIFF", "PNG", "GIF"}),
            min_long_side=1000,
            min_fill=0.85,
            max_bytes=10 * 1024 * 1024,
            require_srgb=True,
        ),
        Preset(
            "etsy",
            (2700, 2025),
            WHITE,
            0.8,
            "jpg",
            frozenset({"JPEG", "PNG", "GIF"}),
            min_short_side=2000,
            aspect=(4, 3),
            require_srgb=True,
        ),
        Preset(
            "ebay",
            (1600, 1600),
            WHITE,
            0.85,
            "jpg",
            frozenset({"JPEG", "PNG", "TIFF", "BMP", "GIF", "WEBP", "HEIF", "AVIF"}),
            min_long_side=500,
            require_srgb=True,
        ),
        Preset(
            "shopify",
            (2048, 2048),
            None,
            0.85,
            "png",
            frozenset({"JPEG", "PNG", "WEBP", "GIF", "HEIF"}),
            aspect=(1, 1),
            max_pixels=25_000_000,
            max_bytes=20 * 1024 * 1024,
        ),
        Preset(
            "square",
            (1200, 1200),
            WHITE,
            0.85,
            "jpg",
            frozenset({"JPEG", "PNG", "GIF"}),
            aspect=(1, 1),
            require_srgb=True,
        ),
    )
}


def get_preset(name: str) -> Preset:
    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise InvalidInput(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
    return preset


def check(preset: Preset, body: bytes, subject: tuple[int, int, int, int] | None) -> list[str]:
    """The rules `body` breaks (empty = compliant). `subject` is where the layout put it."""
    img = Image.open(io.BytesIO(body))
    img.load()
    w, h = img.size
    reasons: list[str] = []
    if img.format not in preset.formats:
        reasons.append(f"format_{str(img.format).lower()}_not_accepted")
    if preset.require_srgb and not _is_srgb(img):
        reasons.append("not_srgb")
    if max(w, h) < preset.min_long_side:
        reasons.append(f"long_side_{max(w, h)}px_below_{preset.min_long_side}px")
    if min(w, h) < preset.min_short_side:
        reasons.append(f"short_side_{min(w, h)}px_below_{preset.min_short_side}px")
    if preset.aspect is not None and abs(w * preset.aspect[1] / (h * preset.aspect[0]) - 1) > 0.01:
        reasons.append(f"aspect_not_{preset.aspect[0]}:{preset.aspect[1]}")
    if preset.max_pixels is not None and w * h > preset.max_pixels:
        reasons.append(f"over_{preset.max_pixels}_pixels")
    if preset.max_bytes is not None and len(body) > preset.max_bytes:
        reasons.append(f"file_over_{preset.max_bytes}_bytes")
    if subject is None:
        return [*reasons, "no_subject"]
    sx0, sy0, sx1, sy1 = subject
    fill = max((sx1 - sx0) / w, (sy1 - sy0) / h)
    if preset.min_fill is not None and fill < preset.min_fill:
        reasons.append(f"fill_{fill:.2f}_below_{preset.min_fill:.2f}")
    if sx0 <= 0 or sy0 <= 0 or sx1 >= w or sy1 >= h:
        reasons.append("subject_cut_by_edge")
    if preset.centred and (
        abs((sx0 + sx1) / 2 - w / 2) > CENTRE_TOLERANCE * w
        or abs((sy0 + sy1) / 2 - h / 2) > CENTRE_TOLERANCE * h
    ):
        reasons.append("not_centred")
    if not _background_ok(img, preset.background, subject):
        reasons.append(
            "background_not_pure_white" if preset.background else "background_not_transparent"
        )
    return reasons


def _is_srgb(img: Image.Image) -> bool:
    if img.mode not in ("RGB", "RGBA", "L"):
        return False
    icc = img.info.get("icc_profile")
    if not icc:
        return True  # untagged RGB is read as sRGB
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ImageCms.PyCMSError):
        return False
    return "srgb" in ImageCms.getProfileDescription(profile).lower().replace(" ", "")


def _background_ok(
    img: Image.Image, background: RGBA | None, subject: tuple[int, int, int, int]
) -> bool:
    """Every pixel away from the subject is the preset's background, exactly."""
    w, h = img.size
    outside = np.ones((h, w), dtype=bool)
    x0, y0, x1, y1 = subject
    outside[
        max(0, y0 - EDGE_GUARD_PX) : min(h, y1 + EDGE_GUARD_PX),
        max(0, x0 - EDGE_GUARD_PX) : min(w, x1 + EDGE_GUARD_PX),
    ] = False
    if background is None:
        if img.mode != "RGBA":
            return False
        return bool((np.asarray(img.getchannel("A"))[outside] == 0).all())
    rgb = np.asarray(img.convert("RGB"))
    return bool((rgb[outside] == np.array(background[:3], dtype=np.uint8)).all())
