"""Decoding: orientation, colour, bit depth, limits, and clear errors for bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from imgsvc import images
from imgsvc.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from tests.utils import DATA

LIMITS = images.Limits(max_bytes=5_000_000, max_pixels=4_000_000)


def save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def tall_marker() -> Image.Image:
    """40 wide x 60 tall, red block at the top: upright when red is at the top."""
    img = Image.new("RGB", (40, 60), "white")
    img.paste((255, 0, 0), (0, 0, 40, 10))
    return img


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied(orientation: int) -> None:
    upright = tall_marker()
    # Store the pixels as a camera would (sideways) with the tag that rotates them back.
    stored = upright.transpose(
        Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    )
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = images.decode(save(stored, "JPEG", exif=exif, quality=95), LIMITS)
    assert out.size == (40, 60)
    top, bottom = np.asarray(out)[2, 20], np.asarray(out)[55, 20]
    assert top[0] > 200 and top[1] < 60  # red on top
    assert bottom.min() > 200  # white at the bottom


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = images.decode(save(cmyk, "JPEG"), LIMITS)
    assert out.mode == "RGB"
    r, g, b = np.asarray(out)[8, 8]
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_scaled_to_8bit() -> None:
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    out = images.decode(save(Image.fromarray(arr), "PNG"), LIMITS)
    assert out.mode == "RGB"
    assert abs(int(np.asarray(out)[0, 0, 0]) - 128) <= 1


def test_icc_profile_converted_to_srgb() -> None:
    lab_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = Image.open(DATA / "car.jpg").convert("RGB")
    out = images.decode(save(src, "PNG", icc_profile=lab_profile), LIMITS)
    assert out.mode == "RGB"
    assert "icc_profile" not in out.info
    diff = np.abs(np.asarray(out, dtype=np.int16) - np.asarray(src, dtype=np.int16))
    assert diff.max() <= 2


def test_alpha_kept_and_palette_transparency() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert images.decode(save(rgba, "PNG"), LIMITS).mode == "RGBA"
    pal = Image.new("P", (8, 8), 0)
    pal.info["transparency"] = 0
    assert images.decode(save(pal, "PNG", transparency=0), LIMITS).mode == "RGBA"
    assert images.decode(save(Image.new("LA", (4, 4)), "PNG"), LIMITS).mode == "RGBA"
    assert images.decode(save(Image.new("L", (4, 4)), "PNG"), LIMITS).mode == "RGB"


def test_refusals() -> None:
    with pytest.raises(UnsupportedMediaType):
        images.decode(b"%PDF-1.4 not an image", LIMITS)
    with pytest.raises(InvalidImage):
        images.decode(save(tall_marker(), "PNG")[:60], LIMITS)
    with pytest.raises(InvalidImage):
        images.decode(b"", LIMITS)
    with pytest.raises(PayloadTooLarge):
        images.decode(b"x" * 6_000_000, LIMITS)
    with pytest.raises(PayloadTooLarge):
        images.decode(save(Image.new("L", (2100, 2000)), "PNG"), LIMITS)


def test_mask_rules() -> None:
    rgba_mask = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba_mask.paste((255, 255, 255, 255), (2, 2, 5, 5))
    mask = images.decode_mask(save(rgba_mask, "PNG"), LIMITS, (10, 10))
    assert mask.mode == "L"
    assert np.asarray(mask)[3, 3] == 255 and np.asarray(mask)[8, 8] == 0
    with pytest.raises(InvalidImage, match="same size"):
        images.decode_mask(save(rgba_mask, "PNG"), LIMITS, (11, 10))


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_encode_round_trip(fmt: images.OutputFormat) -> None:
    img = Image.new("RGBA", (12, 9), (200, 10, 10, 128))
    out = Image.open(io.BytesIO(images.encode(img, fmt)))
    assert out.size == (12, 9)
    assert out.mode == ("RGB" if fmt == "jpg" else "RGBA")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
@pytest.mark.parametrize("srgb", [False, True])
def test_png_is_lossless_in_every_mode_and_tags_srgb(mode: str, srgb: bool) -> None:
    bands = len(mode)
    pixels = np.random.default_rng(bands).integers(0, 256, (37, 23, bands), dtype=np.uint8)
    img = Image.fromarray(pixels[:, :, 0] if bands == 1 else pixels, mode)
    out = Image.open(io.BytesIO(images.encode(img, "png", srgb_profile=srgb)))
    assert out.mode == mode
    assert np.array_equal(np.asarray(out).reshape(pixels.shape), pixels)
    assert out.info.get("icc_profile") == (images.SRGB_ICC if srgb else None)


def test_png_of_other_modes_goes_through_pillow() -> None:
    img = Image.new("P", (8, 8), 3)
    img.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90])
    out = Image.open(io.BytesIO(images.encode(img, "png")))
    assert out.mode == "P" and out.convert("RGB").getpixel((0, 0)) == (70, 80, 90)
