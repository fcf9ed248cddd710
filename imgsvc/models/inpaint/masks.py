"""Inpainting masks: from a mask image, rectangles or the image's alpha; grown and feathered.

Every function returns or takes a mode-L image the size of the photo where 255 = repaint. The
final blend mask is `feather(grow(hole, grow_px), blur_px)`: the grown hole stays fully 255 and
the feather only spreads *outwards*, at most `blur_px` pixels (a truncated Gaussian), so every
pixel farther than `grow_px + blur_px` from the mask is 0 and is returned bit-identical.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from imgsvc.errors import InvalidInput

MAX_BOXES = 100
MAX_GROW_PX = 256
MAX_BLUR_PX = 128


def from_image(mask: Image.Image) -> Image.Image:
    """A decoded mask (L) → binary hole: grey levels above 127 are repainted."""
    return mask.convert("L").point(lambda v: 255 if v > 127 else 0)


def from_alpha(image: Image.Image) -> Image.Image:
    """The image's transparent pixels (alpha below 128) as the hole; empty for opaque images."""
    if image.mode != "RGBA":
        return Image.new("L", image.size, 0)
    return image.getchannel("A").point(lambda a: 255 if a < 128 else 0)


def parse_boxes(text: str, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """`mask_boxes` JSON → (left, top, right, bottom) rectangles clipped to the image.

    Accepts `[[x, y, width, height], ...]` or `[{"x": .., "y": .., "width": .., "height": ..}]`
    in pixels. A rectangle entirely outside the image, or with a side below 1, is an error.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"mask_boxes is not valid JSON: {exc.msg}") from None
    if not isinstance(data, list) or not data:
        raise InvalidInput("mask_boxes must be a non-empty JSON array of [x, y, width, height]")
    if len(data) > MAX_BOXES:
        raise InvalidInput(f"mask_boxes has {len(data)} rectangles; at most {MAX_BOXES}")
    width, height = size
    boxes = []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            item = [item.get("x"), item.get("y"), item.get("width"), item.get("height")]
        if (
            not isinstance(item, list)
            or len(item) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
        ):
            raise InvalidInput(
                f"mask_boxes[{i}] must be [x, y, width, height] in whole pixels, got {item!r}"
            )
        x, y, w, h = item
        if w < 1 or h < 1:
            raise InvalidInput(f"mask_boxes[{i}] has width {w} and height {h}; both must be >= 1")
        left, top, right, bottom = max(0, x), max(0, y), min(width, x + w), min(height, y + h)
        if left >= right or top >= bottom:
            raise InvalidInput(f"mask_boxes[{i}] {item} lies outside the {width}x{height} image")
        boxes.append((left, top, right, bottom))
    return boxes


def from_boxes(boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> Image.Image:
    hole = Image.new("L", size, 0)
    for box in boxes:
        hole.paste(255, box)
    return hole


def union(first: Image.Image, second: Image.Image) -> Image.Image:
    return Image.fromarray(np.maximum(np.asarray(first), np.asarray(second)), "L")


def is_empty(hole: Image.Image) -> bool:
    return hole.getbbox() is None


def grow(hole: Image.Image, px: int) -> Image.Image:
    """Dilate the hole by `px` pixels (elliptic structuring element)."""
    if px <= 0:
        return hole
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
    return Image.fromarray(cv2.dilate(np.asarray(hole), kernel), "L")


def feather(hole: Image.Image, px: int) -> Image.Image:
    """Soften the hole's edge outwards over `px` pixels; the hole itself stays 255."""
    if px <= 0:
        return hole
    import cv2

    arr = np.asarray(hole)
    # Kernel (2px+1)² truncates the Gaussian at `px`: nothing spreads farther than that.
    soft = cv2.GaussianBlur(arr, (2 * px + 1, 2 * px + 1), sigmaX=px / 2, sigmaY=px / 2)
    return Image.fromarray(np.maximum(arr, soft), "L")


def blend_mask(hole: Image.Image, *, grow_px: int, blur_px: int) -> Image.Image:
    """The mask the result is pasted back with: grown, then feathered outwards."""
    if not 0 <= grow_px <= MAX_GROW_PX:
        raise InvalidInput(f"grow_mask must be between 0 and {MAX_GROW_PX} pixels")
    if not 0 <= blur_px <= MAX_BLUR_PX:
        raise InvalidInput(f"mask_blur must be between 0 and {MAX_BLUR_PX} pixels")
    return feather(grow(hole, grow_px), blur_px)
