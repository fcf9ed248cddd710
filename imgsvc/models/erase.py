"""Object erase without weights: OpenCV's Telea inpainting. Pixels outside the mask are kept."""

from __future__ import annotations

import numpy as np
from PIL import Image

NAME = "opencv-telea"


def erase(img: Image.Image, mask: Image.Image, *, radius: int = 5) -> Image.Image:
    """Fill the white area of `mask` (mode L, same size) from its surroundings."""
    import cv2

    rgb = np.asarray(img.convert("RGB"))
    hole = np.asarray(mask) > 127
    filled = cv2.inpaint(rgb, hole.astype(np.uint8) * 255, radius, cv2.INPAINT_TELEA)
    out = np.where(hole[..., None], filled, rgb).astype(np.uint8)
    result = Image.fromarray(out, "RGB")
    if img.mode == "RGBA":
        result.putalpha(img.getchannel("A"))
    return result
