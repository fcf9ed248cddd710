"""A cut-out's options resolved against its image: numbers, boxes and the preset applied.

`remove_background.prepare` builds one from the caller's `RemoveBackgroundOptions` (strings as
remove.bg takes them); the pipeline, the layout and the encoder read only this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

from imgsvc.operations.cutout.options import NO_MARGIN, RGBA, Margin, Size
from imgsvc.operations.cutout.presets import Preset

ResultFormat = Literal["auto", "png", "webp", "jpg", "zip"]
Channels = Literal["rgba", "alpha"]


@dataclass(frozen=True)
class CutoutSpec:
    size: Size = "full"
    format: ResultFormat = "png"
    channels: Channels = "rgba"
    bg_color: RGBA | None = None
    bg_image: Image.Image | None = None
    # layout (remove.bg's rules, see layout.py)
    crop: bool = False
    margin: Margin = NO_MARGIN
    scale: float | None = None  # the subject's share of the canvas; None = original size
    position: tuple[float, float] | None = None  # None = where it was
    canvas: tuple[int, int] | None = None  # a preset's fixed canvas
    roi: tuple[int, int, int, int] | None = None  # in input pixels
    preset: Preset | None = None
    quality: int = 90
    # rembg's mask and cut-out refinements
    post_process_mask: bool = False
    alpha_matting: bool = False
    foreground_threshold: int = 240
    background_threshold: int = 10
    erode_size: int = 10
    decontaminate: bool = False

    @property
    def moves(self) -> bool:
        """Whether the layout moves or rescales the subject (not only crops it)."""
        return self.scale is not None or self.position is not None or self.canvas is not None
