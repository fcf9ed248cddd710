"""Inpainting: erase the masked area (no prompt), or repaint it following a prompt.

Only a padded crop around the mask is processed (at the model's native resolution) and blended
back with the grown and feathered mask: every pixel farther than `grow_mask + mask_blur` from the
mask is returned bit-identical. Erase is flat-priced; prompt inpainting is priced by steps x the
working megapixels of that crop.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from functools import partial
from typing import Literal

from PIL import Image
from pydantic import BaseModel, Field

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.images import OutputFormat
from imgsvc.models.inpaint import masks
from imgsvc.models.inpaint.diffusion import DiffusionInpaintEngine
from imgsvc.models.inpaint.erase import Eraser
from imgsvc.models.inpaint.region import CropPlan
from imgsvc.models.registry import Operation
from imgsvc.operations.context import Context
from imgsvc.operations.prepared import Prepared, Quote, Result

OPERATION: Operation = "inpaint"
MAX_PROMPT_CHARS = 1000
SchedulerName = Literal[
    "pndm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"
]
# grow_mask / mask_blur defaults in pixels, with a prompt and for erase.
PROMPT_GROW, ERASE_GROW = 5, 0
PROMPT_BLUR, ERASE_BLUR = 4, 0
# What the quote assumes a pipeline works on (Stable Diffusion 1.5's native 512x512); the real
# call, or `?dry_run=true` on it, gives the exact figure for the installed model and the mask.
QUOTE_NATIVE_PIXELS = 512 * 512


class InpaintOptions(BaseModel):
    mask_boxes: str | None = Field(
        None,
        description="JSON rectangles to repaint, [[x, y, width, height], ...] or "
        '[{"x":…,"y":…,"width":…,"height":…}] in pixels; added to `mask` when both are sent',
    )
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="omit to erase")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    grow_mask: int | None = Field(
        None,
        ge=0,
        le=masks.MAX_GROW_PX,
        description="grow the mask outwards by this many pixels (default 5 with a prompt, "
        "0 for erase)",
    )
    mask_blur: int | None = Field(
        None,
        ge=0,
        le=masks.MAX_BLUR_PX,
        description="feather the (grown) mask's edge outwards over this many pixels "
        "(default 4 with a prompt, 0 for erase)",
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="echoed in X-Seed; same seed + device = same bytes"
    )
    steps: int = Field(30, ge=1, description="denoising steps (prompt only)")
    guidance_scale: float = Field(7.5, ge=0, le=30)
    strength: float = Field(1.0, gt=0, le=1)
    scheduler: SchedulerName | None = Field(
        None, description="sampler (prompt only); default: the model's"
    )
    model: str | None = Field(
        None,
        description="a diffusers pipeline with a prompt; lama, opencv-telea or opencv-ns "
        "without one; see /v1/models",
    )
    format: OutputFormat = "png"

    @property
    def text(self) -> str:
        """The prompt as used: empty (erase) when absent or blank."""
        return (self.prompt or "").strip()


@dataclass(frozen=True)
class InpaintInputs:
    """The photo, and a mask image (white = repaint) unless the boxes or its alpha say where."""

    image: bytes
    mask: bytes | None = None


def quote(options: InpaintOptions, width: int, height: int, ctx: Context) -> Quote:
    if not options.text:
        credits = ctx.prices.inpaint_cost(prompt=False, steps=0, work_pixels=0)
        return Quote(OPERATION, credits, (width, height), ctx.prices.version)
    work_pixels = min(width * height, QUOTE_NATIVE_PIXELS)
    credits = ctx.prices.inpaint_cost(prompt=True, steps=options.steps, work_pixels=work_pixels)
    return Quote(OPERATION, credits, (width, height), ctx.prices.version, exact=False)


def prepare(options: InpaintOptions, inputs: InpaintInputs, ctx: Context) -> Prepared:
    text = options.text
    if text and options.steps > ctx.max_inpaint_steps:
        raise InvalidInput(f"steps must be at most {ctx.max_inpaint_steps}")
    img = images.decode(inputs.image, ctx.limits)
    images.check_encodable(img.size, options.format)
    hole, from_alpha = _hole(img, inputs.mask, options.mask_boxes, ctx)
    grow, blur = (PROMPT_GROW, PROMPT_BLUR) if text else (ERASE_GROW, ERASE_BLUR)
    alpha = masks.blend_mask(
        hole,
        grow_px=grow if options.grow_mask is None else options.grow_mask,
        blur_px=blur if options.mask_blur is None else options.mask_blur,
    )
    source = img.convert("RGB") if from_alpha else img
    if text:
        return _prepare_prompt(options, text, source, alpha, ctx)
    eraser = ctx.registry.eraser(options.model)
    priced = quote(options, *img.size, ctx)  # erase: the price a quote gives, by construction
    work = partial(_erase, eraser, source, eraser.plan(alpha), options.format)
    return Prepared(priced, eraser.name, img.size, work)


def _prepare_prompt(
    options: InpaintOptions, text: str, source: Image.Image, alpha: Image.Image, ctx: Context
) -> Prepared:
    engine = ctx.registry.diffusion(options.model)
    engine.check(
        prompt=text,
        negative_prompt=options.negative_prompt,
        steps=options.steps,
        strength=options.strength,
    )
    plan = engine.plan(alpha)
    seed = options.seed if options.seed is not None else secrets.randbelow(2**32)
    credits = ctx.prices.inpaint_cost(
        prompt=True, steps=options.steps, work_pixels=plan.work_pixels
    )
    priced = Quote(OPERATION, credits, source.size, ctx.prices.version)  # exact: the real plan
    work = partial(_repaint, engine, source, plan, options, text, seed)
    return Prepared(priced, engine.name, source.size, work)


def _hole(
    img: Image.Image, mask: bytes | None, mask_boxes: str | None, ctx: Context
) -> tuple[Image.Image, bool]:
    """The area to repaint (binary L) and whether it came from the image's alpha channel."""
    hole: Image.Image | None = None
    if mask is not None:
        hole = masks.from_image(images.decode_mask(mask, ctx.limits, img.size))
    if mask_boxes:
        boxed = masks.from_boxes(masks.parse_boxes(mask_boxes, img.size), img.size)
        hole = boxed if hole is None else masks.union(hole, boxed)
    from_alpha = hole is None
    if hole is None:
        hole = masks.from_alpha(img)
    if masks.is_empty(hole):
        where = "the image has no transparent pixels" if from_alpha else "the mask is empty"
        raise InvalidInput(
            f"nothing to repaint: {where}; send `mask` (white = repaint), `mask_boxes`, "
            "or an image whose transparent pixels are the area to repaint"
        )
    return hole, from_alpha


def _erase(eraser: Eraser, source: Image.Image, plan: CropPlan, fmt: OutputFormat) -> Result:
    out = eraser.erase(source, plan)
    return Result(
        images.encode(out, fmt), images.MEDIA_TYPES[fmt], eraser.name, source.size, source.size
    )


def _repaint(
    engine: DiffusionInpaintEngine,
    source: Image.Image,
    plan: CropPlan,
    options: InpaintOptions,
    text: str,
    seed: int,
) -> Result:
    out = engine.inpaint(
        source,
        plan,
        prompt=text,
        negative_prompt=options.negative_prompt,
        seed=seed,
        steps=options.steps,
        guidance_scale=options.guidance_scale,
        strength=options.strength,
        scheduler=options.scheduler,
    )
    body = images.encode(out, options.format)
    media_type = images.MEDIA_TYPES[options.format]
    return Result(body, media_type, engine.name, source.size, source.size, seed=seed)
