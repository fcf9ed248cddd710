"""Object erase without a prompt: the engine interface, and OpenCV's weight-free fill.

An eraser fills the white part of the blend mask from its surroundings, working on a crop
around the mask (`imgsvc.models.inpaint.region`), so pixels outside the mask are returned
bit-identical. LaMa (`imgsvc.models.inpaint.lama`) is used instead when its weights are installed.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from imgsvc.models.inpaint import region

NAME = "opencv-telea"
NAMES: dict[str, Literal["telea", "ns"]] = {"opencv-telea": "telea", "opencv-ns": "ns"}
#: Crops with a longer side above this are filled at this size and scaled back.
MAX_SIDE = 2048


def plan_at_full_size(alpha: Image.Image, max_side: int = MAX_SIDE) -> region.CropPlan:
    """Erase engines work on the crop at its own size, scaled down only past `max_side`."""
    full = region.plan(alpha, None)
    if max(full.work_size) <= max_side:
        return full
    return region.plan(alpha, max_side, upscale=False)


@runtime_checkable
class Eraser(Protocol):
    """What the inpaint operation needs from an erase engine."""

    name: str

    def plan(self, alpha: Image.Image) -> region.CropPlan: ...

    def erase(self, image: Image.Image, plan: region.CropPlan) -> Image.Image: ...


class OpenCVEraser:
    """OpenCV's Telea (fast marching) or Navier-Stokes inpainting; needs no weights."""

    def __init__(self, name: str = NAME, *, radius: int = 5) -> None:
        self.name = name
        self._method = NAMES[name]
        self._radius = radius

    def plan(self, alpha: Image.Image) -> region.CropPlan:
        return plan_at_full_size(alpha)

    def erase(self, image: Image.Image, plan: region.CropPlan) -> Image.Image:
        import cv2

        rgb, hole = region.crop(image, plan)
        flag = cv2.INPAINT_TELEA if self._method == "telea" else cv2.INPAINT_NS
        filled = cv2.inpaint(np.asarray(rgb), np.asarray(hole), self._radius, flag)
        return region.paste_back(image, plan, Image.fromarray(filled, "RGB"))
