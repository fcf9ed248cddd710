"""Place a cut-out subject on its canvas (crop, margin, scale, position) and fill the background.

The rules follow remove.bg: `crop` trims the empty area and adds `crop_margin`; `scale` makes the
subject fill that share of the canvas (fitting both sides) and implies `position=center`;
`position` places the subject (0 % = left/top, 100 % = right/bottom). A preset gives a fixed
canvas with a default scale and centring.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from imgsvc.operations.cutout.options import RGBA
from imgsvc.operations.cutout.spec import CutoutSpec

# Alpha at or above this counts as subject when trimming (faint model noise does not).
SUBJECT_ALPHA = 10


@dataclass(frozen=True)
class Placed:
    """The laid-out RGBA image and where the subject ended up (None when there is none)."""

    image: Image.Image
    subject_box: tuple[int, int, int, int] | None


def subject_box(alpha: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box of the pixels with alpha >= SUBJECT_ALPHA, or None."""
    box = alpha.point(lambda a: 255 if a >= SUBJECT_ALPHA else 0).getbbox()
    return None if box is None else (int(box[0]), int(box[1]), int(box[2]), int(box[3]))


def place(cutout: Image.Image, layout: CutoutSpec) -> Placed:
    """Apply the spec's layout (crop, margin, scale, position, canvas) to an RGBA cut-out."""
    box = subject_box(cutout.getchannel("A"))
    moves = layout.moves
    if box is None:
        canvas = layout.canvas or cutout.size
        if canvas == cutout.size:
            return Placed(cutout, None)
        return Placed(Image.new("RGBA", canvas, (0, 0, 0, 0)), None)
    if not layout.crop and not moves:
        return Placed(cutout, box)
    subject = cutout.crop(box)
    top, right, bottom, left = layout.margin.resolve(*subject.size) if layout.crop else (0,) * 4
    if layout.canvas is not None:
        canvas = layout.canvas
    elif layout.crop:
        canvas = (subject.width + left + right, subject.height + top + bottom)
    else:
        canvas = cutout.size
    if not moves:  # crop only: the subject sits inside its margins
        out = Image.new("RGBA", canvas, (0, 0, 0, 0))
        out.paste(subject, (left, top))
        return Placed(out, (left, top, left + subject.width, top + subject.height))
    inner = (canvas[0] - left - right, canvas[1] - top - bottom)
    if layout.scale is not None:
        factor = layout.scale * min(inner[0] / subject.width, inner[1] / subject.height)
        new_size = (max(1, round(subject.width * factor)), max(1, round(subject.height * factor)))
        if new_size != subject.size:
            subject = subject.resize(new_size, Image.Resampling.LANCZOS)
    px, py = layout.position or (0.5, 0.5)
    x = left + round((inner[0] - subject.width) * px)
    y = top + round((inner[1] - subject.height) * py)
    out = Image.new("RGBA", canvas, (0, 0, 0, 0))
    out.paste(subject, (x, y))
    placed = (
        max(0, x),
        max(0, y),
        min(canvas[0], x + subject.width),
        min(canvas[1], y + subject.height),
    )
    return Placed(out, placed)


def fill_background(
    image: Image.Image, color: RGBA | None, background: Image.Image | None
) -> Image.Image:
    """Composite the RGBA image over a background image (cover-fitted) or a colour."""
    if background is not None:
        base = _cover(background.convert("RGBA"), image.size)
    elif color is not None:
        base = Image.new("RGBA", image.size, color)
    else:
        return image
    return Image.alpha_composite(base, image)


def _cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size`, then centre-crop to it."""
    factor = max(size[0] / img.width, size[1] / img.height)
    scaled = img.resize(
        (max(size[0], round(img.width * factor)), max(size[1], round(img.height * factor))),
        Image.Resampling.LANCZOS,
    )
    left = (scaled.width - size[0]) // 2
    top = (scaled.height - size[1]) // 2
    return scaled.crop((left, top, left + size[0], top + size[1]))


_VISIBLE = [0] + [255] * 255  # alpha → 255 where any part of the pixel shows


def clear_transparent(image: Image.Image) -> Image.Image:
    """Zero the colour of fully transparent pixels: smaller, faster PNG, nothing visible."""
    visible = image.getchannel("A").point(_VISIBLE)
    # Where alpha is 0 the result is (0, 0, 0, 0), which has the same (zero) alpha; one of
    # Pillow's C loops: faster than numpy or than splitting the bands.
    return Image.composite(image, Image.new("RGBA", image.size), visible)


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale (keeping the aspect ratio) so that the image has at most `max_pixels`."""
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    factor = (max_pixels / pixels) ** 0.5
    size = (max(1, int(image.width * factor)), max(1, int(image.height * factor)))
    return image.resize(size, Image.Resampling.LANCZOS)
