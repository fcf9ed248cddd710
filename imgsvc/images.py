"""Image decode / validate / encode. Everything that enters is upright, 8-bit sRGB RGB or RGBA."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from imgsvc.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from imgsvc.png_stream import encode_png

OutputFormat = Literal["png", "webp", "jpg"]
# HEIF = HEIC/HEIF phone photos (pillow-heif); AVIF is decoded by Pillow itself.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP", "MPO", "HEIF", "AVIF"})
MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "webp": "image/webp",
    "jpg": "image/jpeg",
}

# We enforce our own pixel limit before decoding; Pillow's bomb check would only warn/raise later.
Image.MAX_IMAGE_PIXELS = None
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
SRGB_ICC: bytes = _SRGB.tobytes()
_FAST_PNG_MODES = ("L", "LA", "RGB", "RGBA")
pillow_heif.register_heif_opener()


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int


def decode(data: bytes, limits: Limits, *, what: str = "image") -> Image.Image:
    """Bytes → upright sRGB image in mode RGB or RGBA, or a clear 4xx error."""
    if not data:
        raise InvalidImage(f"{what} is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_bytes}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"{what} is not a supported image "
            "(send JPEG, PNG, WebP, GIF, TIFF, BMP, HEIC/HEIF or AVIF)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:  # a header cut short or corrupt
        raise InvalidImage(f"{what} could not be decoded (truncated or corrupt file)") from exc
    if img.format not in ACCEPTED_FORMATS:
        raise UnsupportedMediaType(f"{what} format {img.format} is not supported")
    w, h = img.size
    if w * h > limits.max_pixels:
        raise PayloadTooLarge(f"{what} is {w}x{h} = {w * h} pixels; limit is {limits.max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when already upright
            return _to_srgb_8bit(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"{what} could not be decoded (truncated or corrupt file)") from exc


def _to_srgb_8bit(img: Image.Image) -> Image.Image:
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
            converted = ImageCms.profileToProfile(img, src, _SRGB, outputMode=out_mode)
            if converted is not None:
                img = converted
        except (ImageCms.PyCMSError, OSError):
            pass  # a broken embedded profile: fall back to treating the pixels as sRGB
    target = "RGBA" if has_alpha else "RGB"
    if img.mode != target:
        img = img.convert(target)
    img.info.pop("icc_profile", None)
    return img


def encode(
    img: Image.Image, fmt: OutputFormat, *, quality: int = 90, srgb_profile: bool = False
) -> bytes:
    """PIL image → bytes. JPEG has no alpha: transparent areas are flattened onto white.

    `srgb_profile` embeds the sRGB ICC profile (marketplaces that require tagged sRGB).
    """
    profile = SRGB_ICC if srgb_profile else None
    if fmt == "png" and img.mode in _FAST_PNG_MODES:
        # Deflate level 1, ISA-L where installed: much faster than Pillow's encoder for the
        # same size (bench/png_encode.py, BENCHMARKS.md).
        return encode_png(np.asarray(img), icc_profile=profile)
    buf = io.BytesIO()
    icc = {"icc_profile": profile} if profile else {}
    if fmt == "png":
        img.save(buf, "PNG", compress_level=1, **icc)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4, **icc)
    else:
        if img.mode in ("RGBA", "LA"):
            flat = Image.new("RGB", img.size, (255, 255, 255))
            flat.paste(img, mask=img.getchannel("A"))
            img = flat
        img.convert("RGB").save(buf, "JPEG", quality=quality, optimize=False, **icc)
    return buf.getvalue()


def decode_mask(data: bytes, limits: Limits, size: tuple[int, int]) -> Image.Image:
    """A mask image → mode L, white (255) = repaint. Must match the image's size."""
    mask = decode(data, limits, what="mask")
    if mask.size != size:
        raise InvalidImage(
            f"mask is {mask.size[0]}x{mask.size[1]} but the image is {size[0]}x{size[1]}; "
            "send a mask of the same size"
        )
    if mask.mode == "RGBA":
        # Transparent pixels count as black (keep); opaque ones by their grey level.
        black = Image.new("RGB", mask.size, (0, 0, 0))
        black.paste(mask, mask=mask.getchannel("A"))
        mask = black
    return mask.convert("L")
