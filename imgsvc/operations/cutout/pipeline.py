"""One background removal, transport-free: image + options → encoded result + facts to report.

Stages: (preview downscale) → mask on the ROI → cut-out (post-process / matting /
decontamination) → layout (crop, margin, scale, position, preset canvas) → background →
channels → encode → compliance check. Empty or full-frame masks are flagged as not useful.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from imgsvc import images
from imgsvc.models.background.remover import BackgroundRemover
from imgsvc.operations.cutout import presets
from imgsvc.operations.cutout.layout import (
    Placed,
    clear_transparent,
    fill_background,
    fit_pixels,
    place,
)
from imgsvc.operations.cutout.options import PREVIEW_PIXELS
from imgsvc.operations.cutout.spec import CutoutSpec

ZIP_MEDIA_TYPE = "application/zip"
# A mask covering less than this share of the frame is "empty", more than 1 - it "full".
USELESS_COVERAGE = 0.005


@dataclass(frozen=True)
class Removal:
    body: bytes
    format: Literal["png", "webp", "jpg", "zip"]
    media_type: str
    size: tuple[int, int]
    subject_box: tuple[int, int, int, int] | None  # in the output
    coverage: float  # share of the (ROI) frame the mask covers
    warning: str | None  # why the result is not useful (then it is not charged)
    compliance: list[str] | None  # None without a preset; [] = passes


def expected_size(input_size: tuple[int, int], spec: CutoutSpec) -> tuple[int, int]:
    """The output size known before the work (crop can only make it smaller)."""
    size = spec.canvas or input_size
    if spec.size == "preview":
        return _fit_size(size, PREVIEW_PIXELS)
    return size


def remove_background(engine: BackgroundRemover, img: Image.Image, spec: CutoutSpec) -> Removal:
    work = fit_pixels(img, PREVIEW_PIXELS) if spec.size == "preview" else img
    roi = _scaled_roi(spec.roi, img.size, work.size)
    mask = _mask(engine, work, roi, post_process=spec.post_process_mask)
    coverage = _coverage(mask, roi)
    cutout = engine.cutout(
        work,
        mask,
        alpha_matting=spec.alpha_matting,
        foreground_threshold=spec.foreground_threshold,
        background_threshold=spec.background_threshold,
        erode_size=spec.erode_size,
        decontaminate=spec.decontaminate,
    )
    layout = spec if spec.canvas is None else replace(spec, canvas=expected_size(spec.canvas, spec))
    placed = place(clear_transparent(cutout), layout)
    if spec.size == "preview":
        placed = _fit_placed(placed, PREVIEW_PIXELS)
    body, fmt, media = _encode(placed.image, spec)
    compliance = (
        None if spec.preset is None else presets.check(spec.preset, body, placed.subject_box)
    )
    return Removal(
        body=body,
        format=fmt,
        media_type=media,
        size=placed.image.size,
        subject_box=placed.subject_box,
        coverage=coverage,
        warning=_warning(coverage),
        compliance=compliance,
    )


def _mask(
    engine: BackgroundRemover,
    img: Image.Image,
    roi: tuple[int, int, int, int] | None,
    *,
    post_process: bool,
) -> Image.Image:
    """The model's mask; with a ROI the model sees only the ROI and the rest is background."""
    if roi is None or roi == (0, 0, *img.size):
        return engine.mask(img, post_process=post_process)
    mask = Image.new("L", img.size, 0)
    mask.paste(engine.mask(img.crop(roi), post_process=post_process), roi[:2])
    return mask


def _scaled_roi(
    roi: tuple[int, int, int, int] | None, original: tuple[int, int], work: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    if roi is None or original == work:
        return roi
    sx, sy = work[0] / original[0], work[1] / original[1]
    x0, y0 = int(roi[0] * sx), int(roi[1] * sy)
    return (x0, y0, max(x0 + 1, round(roi[2] * sx)), max(y0 + 1, round(roi[3] * sy)))


def _coverage(mask: Image.Image, roi: tuple[int, int, int, int] | None) -> float:
    region = mask if roi is None else mask.crop(roi)
    return float((np.asarray(region) >= 128).mean())


def _warning(coverage: float) -> str | None:
    if coverage < USELESS_COVERAGE:
        return "empty_mask: no foreground was found; this result is not charged"
    if coverage > 1.0 - USELESS_COVERAGE:
        return "full_mask: the whole frame was kept as foreground; this result is not charged"
    return None


def _fit_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    pixels = size[0] * size[1]
    if pixels <= max_pixels:
        return size
    factor = (max_pixels / pixels) ** 0.5
    return (max(1, int(size[0] * factor)), max(1, int(size[1] * factor)))


def _fit_placed(placed: Placed, max_pixels: int) -> Placed:
    """Preview: crop margins can grow the canvas, so fit the laid-out result once more."""
    image = fit_pixels(placed.image, max_pixels)
    if image is placed.image or placed.subject_box is None:
        return Placed(image, placed.subject_box)
    sx, sy = image.width / placed.image.width, image.height / placed.image.height
    x0, y0, x1, y1 = placed.subject_box
    return Placed(image, (int(x0 * sx), int(y0 * sy), round(x1 * sx), round(y1 * sy)))


def _encode(
    image: Image.Image, spec: CutoutSpec
) -> tuple[bytes, Literal["png", "webp", "jpg", "zip"], str]:
    composed = fill_background(image, spec.bg_color, spec.bg_image)
    srgb = spec.preset is not None and spec.preset.require_srgb
    if spec.format == "zip":
        return _zip(composed, spec.quality), "zip", ZIP_MEDIA_TYPE
    fmt: images.OutputFormat
    if spec.format == "auto":
        opaque = composed.getchannel("A").getextrema() == (255, 255)
        fmt = "jpg" if opaque or spec.channels == "alpha" else "png"
    else:
        fmt = spec.format
    out = composed.getchannel("A") if spec.channels == "alpha" else composed
    body = images.encode(out, fmt, quality=spec.quality, srgb_profile=srgb)
    return body, fmt, images.MEDIA_TYPES[fmt]


def _zip(image: Image.Image, quality: int) -> bytes:
    """remove.bg's ZIP: `color.jpg` (the colours) + `alpha.png` (the matte), same size."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("color.jpg", images.encode(image.convert("RGB"), "jpg", quality=quality))
        zf.writestr("alpha.png", images.encode(image.getchannel("A"), "png"))
    return buf.getvalue()
