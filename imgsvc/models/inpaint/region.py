"""Work only on the masked area: a padded crop box around the mask, and the paste-back.

An engine runs on `crop(image)` scaled to `plan.work_size` (its native resolution), and
`paste_back` scales the result to the crop box and blends it in with the blend mask. Pixels
outside the crop box are never touched and pixels inside it where the mask is 0 are copied, so
every pixel outside the mask is bit-identical to the input, and memory is bounded by the crop,
whatever the image's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from imgsvc.errors import InvalidInput

Box = tuple[int, int, int, int]
#: Context kept around the mask: at least this many pixels, plus PAD_FRACTION of its longer side.
MIN_PAD = 32
PAD_FRACTION = 0.125
#: Crops are widened (within the image) until their sides are at most this ratio apart.
MAX_ASPECT = 2.0


@dataclass(frozen=True)
class CropPlan:
    """Where to work and at what size; `alpha` is the full-size blend mask (L, 255 = repaint)."""

    alpha: Image.Image
    box: Box
    work_size: tuple[int, int]

    @property
    def work_pixels(self) -> int:
        return self.work_size[0] * self.work_size[1]

    @property
    def box_size(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return right - left, bottom - top


def _widen(lo: int, hi: int, want: int, limit: int) -> tuple[int, int]:
    """Grow [lo, hi) to length `want` around its centre, shifted to stay within [0, limit)."""
    want = min(want, limit)
    extra = want - (hi - lo)
    if extra <= 0:
        return lo, hi
    lo -= extra // 2
    hi += extra - extra // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = max(0, lo - (hi - limit)), limit
    return lo, hi


def crop_box(alpha: Image.Image) -> Box:
    """The mask's bounding box with context around it, kept within the image."""
    bbox = alpha.getbbox()
    if bbox is None:
        raise InvalidInput("the mask is empty: paint the area to change in white")
    left, top, right, bottom = bbox
    width, height = alpha.size
    pad = MIN_PAD + int(PAD_FRACTION * max(right - left, bottom - top))
    left, top = max(0, left - pad), max(0, top - pad)
    right, bottom = min(width, right + pad), min(height, bottom + pad)
    longer = max(right - left, bottom - top)
    short_min = int(np.ceil(longer / MAX_ASPECT))
    left, right = _widen(left, right, short_min, width)
    top, bottom = _widen(top, bottom, short_min, height)
    return left, top, right, bottom


def fit(size: tuple[int, int], side: int, *, upscale: bool = True) -> tuple[int, int]:
    """Scale `size` so its longer side is `side` (never up when `upscale` is False).

    Both sides become multiples of 8 (at least 8), as diffusion and LaMa models need.
    """
    width, height = size
    limit = max(8, side // 8 * 8)
    scale = limit / max(width, height)
    if not upscale:
        scale = min(1.0, scale)

    def to8(v: int) -> int:
        return min(limit, max(8, int(v * scale / 8 + 0.5) * 8))

    return to8(width), to8(height)


def plan(alpha: Image.Image, side: int | None, *, upscale: bool = True) -> CropPlan:
    """Crop box around `alpha` and the working size: the box scaled by `fit` to `side`, or the
    box's own size when `side` is None (engines that work at any size, e.g. OpenCV)."""
    box = crop_box(alpha)
    left, top, right, bottom = box
    size = (right - left, bottom - top)
    return CropPlan(alpha, box, size if side is None else fit(size, side, upscale=upscale))


def crop(image: Image.Image, plan: CropPlan) -> tuple[Image.Image, Image.Image]:
    """The RGB crop and its blend mask, both scaled to the working size."""
    rgb = image.convert("RGB").crop(plan.box)
    mask = plan.alpha.crop(plan.box)
    if rgb.size != plan.work_size:
        rgb = rgb.resize(plan.work_size, Image.Resampling.LANCZOS)
        # Max-pool-like: every working pixel the mask touches at all is repainted.
        mask = mask.resize(plan.work_size, Image.Resampling.BILINEAR)
    return rgb, mask.point(lambda v: 255 if v > 0 else 0)


def composite(original: Image.Image, result: Image.Image, mask: Image.Image) -> Image.Image:
    """`original` where mask==0, `result` where mask==255, linearly blended in between.

    All three must have the same size; `original`/`result` RGB, `mask` L. Exact at 0 and 255:
    (o*(255-m) + r*m + 127) // 255 is o for m=0 and r for m=255.
    """
    o = np.asarray(original, dtype=np.uint32)
    r = np.asarray(result, dtype=np.uint32)
    m = np.asarray(mask, dtype=np.uint32)[..., None]
    out = (o * (255 - m) + r * m + 127) // 255
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def paste_back(image: Image.Image, plan: CropPlan, result: Image.Image) -> Image.Image:
    """`image` with `result` (the repainted crop, any size) blended into the crop box.

    The output keeps the input's mode (an RGBA input keeps its alpha channel unchanged).
    """
    size = plan.box_size
    patch = result.convert("RGB")
    if patch.size != size:
        patch = patch.resize(size, Image.Resampling.LANCZOS)
    rgb = image.convert("RGB")
    blended = composite(rgb.crop(plan.box), patch, plan.alpha.crop(plan.box))
    rgb.paste(blended, plan.box[:2])
    if image.mode == "RGBA":
        rgb.putalpha(image.getchannel("A"))
    return rgb
