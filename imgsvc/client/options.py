"""Each operation's options, as keyword arguments, with the service's names and value forms
(see docs/api.md and the operation's own page); and how they travel as form fields.

An option left out (or None) takes the service's default. Strings such as `crop_margin="10%"` or
`bg_color="#81d4fa80"` are sent as they are and checked by the service (422 `invalid_input`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, TypedDict

Operation = Literal["remove-background", "upscale", "inpaint"]
OutputFormat = Literal["png", "webp", "jpg"]
Scheduler = Literal[
    "pndm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"
]
# One mask rectangle: [x, y, width, height] in pixels.
Box = Sequence[int]
# What a form field or a job option may be given as.
OptionValue = str | int | float | bool


class RemoveBackgroundOptions(TypedDict, total=False):
    model: str | None
    size: Literal["preview", "full", "auto"] | None
    format: Literal["png", "webp", "jpg", "zip", "auto"] | None
    channels: Literal["rgba", "alpha"] | None
    bg_color: str | None
    crop: bool | None
    crop_margin: str | int | None
    scale: str | None
    position: str | None
    roi: str | None
    preset: Literal["amazon", "etsy", "ebay", "shopify", "square"] | None
    alpha_matting: bool | None
    alpha_matting_foreground_threshold: int | None
    alpha_matting_background_threshold: int | None
    alpha_matting_erode_size: int | None
    post_process_mask: bool | None
    decontaminate: bool | None
    quality: int | None


class UpscaleOptions(TypedDict, total=False):
    scale: float | None
    target_width: int | None
    target_height: int | None
    model: str | None
    face_enhance: bool | None
    format: OutputFormat | None
    quality: int | None


class EraseOptions(TypedDict, total=False):
    mask_boxes: str | Sequence[Box] | None
    grow_mask: int | None
    mask_blur: int | None
    model: str | None
    format: OutputFormat | None


class InpaintOptions(EraseOptions, total=False):
    negative_prompt: str | None
    seed: int | None
    steps: int | None
    guidance_scale: float | None
    strength: float | None
    scheduler: Scheduler | None


def form_value(value: object) -> str:
    """A value as the service reads a form field: booleans as true/false, boxes as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Sequence):
        return json.dumps([list(box) if isinstance(box, Sequence) else box for box in value])
    raise TypeError(f"cannot send {type(value).__name__} as a form field")


def form_fields(options: Mapping[str, object]) -> list[tuple[str, str]]:
    """The options given (None meaning "not given") as form fields, in a stable order."""
    return [(name, form_value(value)) for name, value in options.items() if value is not None]


def checked_names(options: Iterable[str], reserved: frozenset[str]) -> None:
    for name in options:
        if name in reserved:
            raise ValueError(f"{name!r} is not an option of an operation")
