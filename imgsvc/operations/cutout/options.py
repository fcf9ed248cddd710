"""Parse remove.bg-style option strings (colours, margins, ROI, scale, position) into numbers.

Every function raises InvalidInput (422) with the field name and what is accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from PIL import ImageColor

from imgsvc.errors import InvalidInput

RGBA = tuple[int, int, int, int]
Size = Literal["preview", "full"]
PREVIEW_PIXELS = 250_000  # remove.bg's preview: 0.25 MP (e.g. 625x400)
MAX_MARGIN_FRACTION = 0.5  # remove.bg: at most 50 % of the subject's size per side…
MAX_MARGIN_PX = 500  # …or 500 px
# remove.bg's size names: preview (= small = regular) is cheaper and smaller; the rest is full.
SIZE_NAMES: dict[str, Size] = {
    "preview": "preview",
    "small": "preview",
    "regular": "preview",
    "full": "full",
    "auto": "full",
    "medium": "full",
    "hd": "full",
    "4k": "full",
    "50mp": "full",
}
_HEX = re.compile(r"[0-9a-fA-F]{3,4}|[0-9a-fA-F]{6}|[0-9a-fA-F]{8}")
_LENGTH = re.compile(r"(\d+(?:\.\d+)?)(px|%)?")


@dataclass(frozen=True)
class Length:
    """A length in px, or a fraction of some reference size."""

    value: float
    relative: bool

    def resolve(self, reference: int) -> int:
        return round(self.value * reference) if self.relative else round(self.value)


@dataclass(frozen=True)
class Margin:
    top: Length
    right: Length
    bottom: Length
    left: Length

    def resolve(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, right, bottom, left) px for a subject of `width` x `height`."""
        return (
            self.top.resolve(height),
            self.right.resolve(width),
            self.bottom.resolve(height),
            self.left.resolve(width),
        )


NO_MARGIN = Margin(*(Length(0, False),) * 4)


def parse_size(text: str) -> Size:
    size = SIZE_NAMES.get(text.strip().lower())
    if size is None:
        raise InvalidInput(f"size must be one of {', '.join(SIZE_NAMES)}; got {text!r}")
    return size


def parse_color(text: str, field: str = "bg_color") -> RGBA:
    """`81d4fa`, `#81d4fa`, `#81d4fa77` (alpha), `fff`, or a CSS name like `white`."""
    value = text.strip()
    if _HEX.fullmatch(value):
        value = f"#{value}"
    try:
        color = ImageColor.getcolor(value, "RGBA")
    except ValueError:
        raise InvalidInput(
            f"{field} must be a hex colour (81d4fa, #81d4fa, #81d4fa80 with alpha) or a colour "
            f"name (white); got {text!r}"
        ) from None
    assert isinstance(color, tuple)
    r, g, b, a = color
    return (r, g, b, a)


def _length(token: str, field: str) -> Length:
    match = _LENGTH.fullmatch(token)
    if match is None:
        raise InvalidInput(f"{field}: {token!r} is not a length like 30px, 30 or 10%")
    number = float(match.group(1))
    if match.group(2) == "%":
        return Length(number / 100.0, True)
    return Length(number, False)


def parse_margin(text: str) -> Margin:
    """remove.bg's crop_margin: 1, 2 or 4 lengths (CSS order), each ≤ 50 % / 500 px."""
    tokens = text.replace(",", " ").split()
    if len(tokens) not in (1, 2, 4):
        raise InvalidInput("crop_margin takes 1, 2 or 4 values, e.g. 30px, 10%, '10% 20px'")
    lengths = [_length(t, "crop_margin") for t in tokens]
    for length in lengths:
        limit = MAX_MARGIN_FRACTION if length.relative else MAX_MARGIN_PX
        if length.value > limit:
            raise InvalidInput("crop_margin is at most 50% of the subject or 500px per side")
    if len(lengths) == 1:
        lengths *= 4
    elif len(lengths) == 2:
        lengths *= 2
    return Margin(*lengths)


def parse_roi(text: str, width: int, height: int) -> tuple[int, int, int, int]:
    """remove.bg's roi `x1 y1 x2 y2` (px or %) → a box inside the image, not empty."""
    tokens = text.replace(",", " ").split()
    if len(tokens) != 4:
        raise InvalidInput("roi takes 4 values x1 y1 x2 y2 in px or %, e.g. '0% 0% 100% 100%'")
    x1, y1, x2, y2 = (
        _length(t, "roi").resolve(width if i % 2 == 0 else height) for i, t in enumerate(tokens)
    )
    box = (max(0, x1), max(0, y1), min(width, x2), min(height, y2))
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        raise InvalidInput(f"roi {text!r} selects no pixel of the {width}x{height} image")
    return box


def parse_scale(text: str) -> float | None:
    """`original` → None; `10%`…`100%` → the subject's share of the canvas."""
    value = text.strip().lower()
    if value == "original":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if match is None or not 10 <= float(match.group(1)) <= 100:
        raise InvalidInput(f"scale must be 'original' or 10% to 100%; got {text!r}")
    return float(match.group(1)) / 100.0


def parse_position(text: str) -> tuple[float, float] | None:
    """`original` → None; `center`; `x%` (both axes) or `x% y%`, 0 % = left/top."""
    value = text.strip().lower()
    if value == "original":
        return None
    if value in ("center", "centre"):
        return (0.5, 0.5)
    tokens = value.replace(",", " ").split()
    parts = [re.fullmatch(r"(\d+(?:\.\d+)?)%", t) for t in tokens]
    if len(tokens) not in (1, 2) or not all(parts):
        raise InvalidInput(f"position must be original, center, 'x%' or 'x% y%'; got {text!r}")
    fractions = [float(p.group(1)) / 100.0 for p in parts if p is not None]
    if not all(0.0 <= f <= 1.0 for f in fractions):
        raise InvalidInput("position percentages are 0% to 100%")
    return (fractions[0], fractions[-1])
