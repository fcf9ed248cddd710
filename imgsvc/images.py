"""Image decode / validate / encode. Everything that enters is upright, 8-bit sRGB RGB or RGBA."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from imgsvc.errors import InvalidImage, InvalidInput, PayloadTooLarge, UnsupportedMediaType
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


# What Pillow and its plugins raise on a file that is cut short or corrupt: its own decoders
# (OSError, SyntaxError, ValueError incl. metadata that decompresses past its limits, EOFError),
# the HEIF and AVIF plugins (RuntimeError, EOFError), its header parsers (struct.error,
# IndexError, and TypeError for a TIFF offset of the wrong type; OverflowError for one past
# what a file offset can hold).
_CORRUPT = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    RuntimeError,
    struct.error,
    IndexError,
    TypeError,
    OverflowError,
)
# How Pillow's messages start for text or profile chunks that inflate past its limits.
_METADATA_TOO_LARGE = ("decompressed data too large", "too much memory used in text chunks")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode(data: bytes, limits: Limits, *, what: str = "image") -> Image.Image:
    """Bytes → upright sRGB image in mode RGB or RGBA, or a clear 4xx error."""
    if not data:
        raise InvalidImage(f"{what} is empty")
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_bytes}")
    with warnings.catch_warnings():  # Pillow warns about corrupt metadata it then skips
        warnings.simplefilter("ignore")
        img = _open(data, what)
        if img.format not in ACCEPTED_FORMATS:
            raise UnsupportedMediaType(f"{what} format {img.format} is not supported")
        w, h = img.size
        if w * h > limits.max_pixels:
            raise PayloadTooLarge(
                f"{what} is {w}x{h} = {w * h} pixels; limit is {limits.max_pixels}"
            )
        if img.format == "PNG":
            _check_png_data(data, what)
        try:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # no copy when already upright
            return _to_srgb_8bit(img)
        except _CORRUPT as exc:
            raise _corrupt(exc, what) from exc


def _open(data: bytes, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnsupportedMediaType(
            f"{what} is not a supported image "
            "(send JPEG, PNG, WebP, GIF, TIFF, BMP, HEIC/HEIF or AVIF)"
        ) from None
    except _CORRUPT as exc:  # a header cut short or corrupt
        raise _corrupt(exc, what) from exc


def _corrupt(exc: Exception, what: str) -> InvalidImage:
    if isinstance(exc, ValueError) and str(exc).lower().startswith(_METADATA_TOO_LARGE):
        return InvalidImage(
            f"{what} has metadata (text or colour profile) that decompresses past the limit; "
            "strip the metadata and send it again"
        )
    return InvalidImage(f"{what} could not be decoded (truncated or corrupt file)")


def _check_png_data(data: bytes, what: str) -> None:
    """Pillow checks the CRC of every PNG chunk but the image data's (IDAT, fdAT): check those,
    so a file whose pixels were damaged is refused as corrupt, as libpng refuses it."""
    view = memoryview(data)
    at = len(_PNG_SIGNATURE)
    while at + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, at)
        end = at + 12 + length
        if end > len(data):
            return  # cut short: the decoder says so
        if kind in (b"IDAT", b"fdAT"):
            (crc,) = struct.unpack_from(">I", data, end - 4)
            if zlib.crc32(view[at + 4 : end - 4]) != crc:  # the type and the data
                raise InvalidImage(f"{what} could not be decoded (corrupt PNG data: bad CRC)")
        elif kind == b"IEND":
            return
        at = end


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


# The largest side each output format can hold (PNG's is far past any pixel limit).
MAX_SIDE: dict[str, int] = {"webp": 16383, "jpg": 65500}


def check_encodable(size: tuple[int, int], fmt: str) -> None:
    """InvalidInput when an output of `size` cannot be written as `fmt`: checked before the
    work runs, so nothing is computed for a result that could not be delivered."""
    limit = MAX_SIDE.get(fmt)
    if limit is not None and max(size) > limit:
        raise InvalidInput(
            f"a {size[0]}x{size[1]} output cannot be written as {fmt} (at most {limit} pixels "
            "a side); ask for png"
        )


def encode(
    img: Image.Image, fmt: OutputFormat, *, quality: int = 90, srgb_profile: bool = False
) -> bytes:
    """PIL image → bytes. JPEG has no alpha: transparent areas are flattened onto white.

    `srgb_profile` embeds the sRGB ICC profile (marketplaces that require tagged sRGB).
    """
    check_encodable(img.size, fmt)
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
