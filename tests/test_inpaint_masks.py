"""Masks (alpha, boxes, grow, feather), the crop plan, the paste-back, OpenCV erase, the queue."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imgsvc.errors import Busy, InvalidInput
from imgsvc.models.admission import Admission
from imgsvc.models.inpaint import masks, region
from imgsvc.models.inpaint.erase import OpenCVEraser
from imgsvc.routes.errors import error_headers, error_status


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _square_dilate(hole: np.ndarray, px: int) -> np.ndarray:
    """Independent reference: every pixel within `px` (Chebyshev distance) of the hole."""
    ys, xs = np.nonzero(hole)
    out = np.zeros_like(hole, dtype=bool)
    for y, x in zip(ys, xs, strict=True):
        out[max(0, y - px) : y + px + 1, max(0, x - px) : x + px + 1] = True
    return out


def test_from_image_and_alpha() -> None:
    mask = Image.new("L", (8, 4), 0)
    mask.putpixel((1, 1), 128)
    mask.putpixel((2, 1), 127)
    assert np.argwhere(np.asarray(masks.from_image(mask)) == 255).tolist() == [[1, 1]]
    rgba = Image.new("RGBA", (8, 4), (10, 20, 30, 255))
    assert masks.is_empty(masks.from_alpha(rgba))
    assert masks.is_empty(masks.from_alpha(rgba.convert("RGB")))
    rgba.putpixel((3, 2), (0, 0, 0, 0))
    assert np.argwhere(np.asarray(masks.from_alpha(rgba)) == 255).tolist() == [[2, 3]]


def test_parse_boxes_both_forms_clipped() -> None:
    boxes = masks.parse_boxes(
        '[[10, 5, 20, 10], {"x": 90, "y": 0, "width": 50, "height": 3}]', (100, 50)
    )
    assert boxes == [(10, 5, 30, 15), (90, 0, 100, 3)]
    hole = np.asarray(masks.from_boxes(boxes, (100, 50)))
    assert int((hole == 255).sum()) == 20 * 10 + 10 * 3


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "JSON"),
        ("[]", "non-empty"),
        ('{"x": 1}', "non-empty"),
        ("[[1, 2, 3]]", "x, y, width, height"),
        ("[[1.5, 2, 3, 4]]", "whole pixels"),
        ("[[0, 0, 0, 4]]", ">= 1"),
        ("[[200, 0, 5, 5]]", "outside"),
        ("[" + ",".join(["[0, 0, 1, 1]"] * 101) + "]", "at most"),
    ],
)
def test_parse_boxes_refuses(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        masks.parse_boxes(text, (100, 50))


def test_grow_and_feather_stay_within_their_radius() -> None:
    hole = Image.new("L", (120, 90), 0)
    hole.paste(255, (50, 40, 60, 45))
    for grow, blur in [(0, 0), (5, 0), (0, 6), (3, 4)]:
        alpha = np.asarray(masks.blend_mask(hole, grow_px=grow, blur_px=blur))
        inside = _square_dilate(np.asarray(hole) > 0, grow)
        assert (alpha[np.asarray(hole) > 0] == 255).all()  # the hole is fully repainted
        assert (alpha[~_square_dilate(np.asarray(hole) > 0, grow + blur)] == 0).all()
        if blur:
            ring = _square_dilate(inside, blur) & ~inside
            assert alpha[ring].max() > 0 and alpha[ring].min() < 255  # feathered edge
    with pytest.raises(InvalidInput):
        masks.blend_mask(hole, grow_px=masks.MAX_GROW_PX + 1, blur_px=0)


def test_crop_box_pads_and_limits_aspect() -> None:
    alpha = Image.new("L", (1000, 700), 0)
    alpha.paste(255, (500, 300, 510, 700))  # a 10x400 strip at the bottom edge
    left, top, right, bottom = region.crop_box(alpha)
    assert left <= 500 - region.MIN_PAD and right >= 510 + region.MIN_PAD
    assert bottom == 700
    assert (bottom - top) <= region.MAX_ASPECT * (right - left)
    with pytest.raises(InvalidInput, match="empty"):
        region.crop_box(Image.new("L", (10, 10), 0))


def test_fit() -> None:
    assert region.fit((96, 72), 64) == (64, 48)
    assert region.fit((40, 30), 512) == (512, 384)  # small crops are worked on at native size
    assert region.fit((40, 30), 512, upscale=False) == (40, 32)
    assert region.fit((3, 700), 512) == (8, 512)


def test_paste_back_touches_only_the_mask_on_a_large_image() -> None:
    image = _noise((1000, 700))
    hole = Image.new("L", image.size, 0)
    hole.paste(255, (400, 250, 460, 300))
    alpha = masks.blend_mask(hole, grow_px=4, blur_px=6)
    plan = region.plan(alpha, 64)
    result = Image.new("RGB", plan.work_size, (255, 0, 0))
    out = np.asarray(region.paste_back(image, plan, result))
    src = np.asarray(image)
    outside = ~_square_dilate(np.asarray(hole) > 0, 4 + 6)
    assert np.array_equal(out[outside], src[outside])
    assert (out[np.asarray(hole) > 0] == (255, 0, 0)).all()


def test_paste_back_keeps_rgba_alpha() -> None:
    image = _noise((64, 48)).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize((64, 48)))
    hole = Image.new("L", image.size, 0)
    hole.paste(255, (20, 20, 30, 30))
    plan = region.plan(hole, None)
    out = region.paste_back(image, plan, Image.new("RGB", plan.work_size, "blue"))
    assert out.mode == "RGBA"
    assert out.getchannel("A").tobytes() == image.getchannel("A").tobytes()


@pytest.mark.parametrize("name", ["opencv-telea", "opencv-ns"])
def test_opencv_erase_on_large_image(name: str) -> None:
    image = _noise((1000, 700), seed=3)
    hole = Image.new("L", image.size, 0)
    hole.paste(255, (700, 100, 760, 180))
    alpha = masks.blend_mask(hole, grow_px=2, blur_px=3)
    eraser = OpenCVEraser(name)
    out = np.asarray(eraser.erase(image, eraser.plan(alpha)))
    src = np.asarray(image)
    outside = ~_square_dilate(np.asarray(hole) > 0, 5)
    assert np.array_equal(out[outside], src[outside])
    assert not np.array_equal(out[100:180, 700:760], src[100:180, 700:760])


def test_queue_admits_depth_plus_one() -> None:
    queue = Admission({"inpaint": 1}, {"inpaint": 1}, exclusive=False)
    with queue.admit("inpaint"), queue.admit("inpaint"):
        assert queue.admitted("inpaint") == 2
        with pytest.raises(Busy) as caught, queue.admit("inpaint"):
            pass
        assert error_status(caught.value) == 503
        assert int(error_headers(caught.value)["Retry-After"]) >= 2
    assert queue.admitted("inpaint") == 0
    with queue.admit("inpaint"):  # free again
        assert queue.admitted("inpaint") == 1
