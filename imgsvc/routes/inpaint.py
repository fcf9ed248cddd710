"""POST /v1/inpaint — erase the masked area, or repaint it from a prompt."""

from __future__ import annotations

import contextlib
import secrets
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.images import Limits, OutputFormat
from imgsvc.models.inpaint import masks
from imgsvc.routes.deps import ApiKeyDep, LimitsDep, PricesDep, RegistryDep, SettingsDep
from imgsvc.routes.metered import (
    IMAGE_RESPONSES,
    EngineResult,
    dry_run_param,
    metered_call,
    read_upload,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(dry_run_param)], tags=["inpaint"])

MAX_PROMPT_CHARS = 1000
SchedulerName = Literal[
    "pndm", "ddim", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"
]
#: grow_mask / mask_blur defaults in pixels: (with a prompt, erase).
DEFAULT_GROW = (5, 0)
DEFAULT_BLUR = (4, 0)


async def _hole(
    img: Image.Image,
    mask: UploadFile | None,
    mask_boxes: str | None,
    limits: Limits,
) -> tuple[Image.Image, bool]:
    """The area to repaint (binary L) and whether it came from the image's alpha channel."""
    hole: Image.Image | None = None
    if mask is not None:
        data = await read_upload(mask, limits, "mask")
        decoded = await run_in_threadpool(images.decode_mask, data, limits, img.size)
        hole = masks.from_image(decoded)
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


@router.post(
    "/inpaint",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Erase an object, or repaint the masked area from a prompt",
    description="Only a padded crop around the mask is processed (at the model's native "
    "resolution) and blended back with the grown and feathered mask: every pixel farther than "
    "`grow_mask + mask_blur` from the mask is returned bit-identical. Without `prompt` the area "
    "is erased (LaMa when installed, else OpenCV Telea); `X-Model` names the engine. When the "
    "device queue is full the answer is 503 `queue_full` with `Retry-After`, uncharged.",
)
async def inpaint(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="the photo (RGBA: see `mask`)")],
    mask: Annotated[
        UploadFile | None,
        File(
            description="same size as the image; white = repaint, black = keep. Without "
            "`mask` and `mask_boxes`, the image's transparent pixels are repainted (the result "
            "is then opaque)"
        ),
    ] = None,
    mask_boxes: Annotated[
        str | None,
        Form(
            description="JSON rectangles to repaint, [[x, y, width, height], ...] or "
            '[{"x":…,"y":…,"width":…,"height":…}] in pixels; added to `mask` when both are sent'
        ),
    ] = None,
    prompt: Annotated[
        str | None, Form(max_length=MAX_PROMPT_CHARS, description="omit to erase")
    ] = None,
    negative_prompt: Annotated[str | None, Form(max_length=MAX_PROMPT_CHARS)] = None,
    grow_mask: Annotated[
        int | None,
        Form(
            ge=0,
            le=masks.MAX_GROW_PX,
            description="grow the mask outwards by this many pixels (default 5 with a prompt, "
            "0 for erase)",
        ),
    ] = None,
    mask_blur: Annotated[
        int | None,
        Form(
            ge=0,
            le=masks.MAX_BLUR_PX,
            description="feather the (grown) mask's edge outwards over this many pixels "
            "(default 4 with a prompt, 0 for erase)",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        Form(ge=0, le=2**32 - 1, description="echoed in X-Seed; same seed + device = same bytes"),
    ] = None,
    steps: Annotated[int, Form(ge=1, description="denoising steps (prompt only)")] = 30,
    guidance_scale: Annotated[float, Form(ge=0, le=30)] = 7.5,
    strength: Annotated[float, Form(gt=0, le=1)] = 1.0,
    scheduler: Annotated[
        SchedulerName | None, Form(description="sampler (prompt only); default: the model's")
    ] = None,
    model: Annotated[
        str | None,
        Form(
            description="a diffusers pipeline with a prompt; lama, opencv-telea or opencv-ns "
            "without one; see /v1/models"
        ),
    ] = None,
    format: Annotated[OutputFormat, Form()] = "png",
) -> Response:
    text = (prompt or "").strip()
    if text and steps > settings.max_inpaint_steps:
        raise InvalidInput(f"steps must be at most {settings.max_inpaint_steps}")
    img = await run_in_threadpool(images.decode, await read_upload(image, limits, "image"), limits)
    hole, from_alpha = await _hole(img, mask, mask_boxes, limits)
    with_prompt = 0 if text else 1
    grow = DEFAULT_GROW[with_prompt] if grow_mask is None else grow_mask
    blur = DEFAULT_BLUR[with_prompt] if mask_blur is None else mask_blur
    alpha = await run_in_threadpool(masks.blend_mask, hole, grow_px=grow, blur_px=blur)
    source = img.convert("RGB") if from_alpha else img

    if text:
        engine = await run_in_threadpool(registry.diffusion, model)
        engine.check(prompt=text, negative_prompt=negative_prompt, steps=steps, strength=strength)
        plan = engine.plan(alpha)
        used_seed = seed if seed is not None else secrets.randbelow(2**32)

        def prompt_work() -> EngineResult:
            out = engine.inpaint(
                source,
                plan,
                prompt=text,
                negative_prompt=negative_prompt,
                seed=used_seed,
                steps=steps,
                guidance_scale=guidance_scale,
                strength=strength,
                scheduler=scheduler,
            )
            headers = {"X-Seed": str(used_seed)}
            body = images.encode(out, format)
            return EngineResult(body, format, engine.name, img.size, img.size, headers)

        credits = prices.inpaint_cost(prompt=True, steps=steps, work_pixels=plan.work_pixels)
        work = prompt_work
    else:
        eraser = await run_in_threadpool(registry.eraser, model)
        erase_plan = eraser.plan(alpha)

        def erase_work() -> EngineResult:
            out = eraser.erase(source, erase_plan)
            return EngineResult(images.encode(out, format), format, eraser.name, img.size, img.size)

        credits = prices.inpaint_cost(prompt=False, steps=0, work_pixels=0)
        work = erase_work

    quote_only = getattr(request.state, "dry_run", False)
    queue = registry.inpaint_queue
    with contextlib.nullcontext() if quote_only else queue.admit():
        return await metered_call(
            request,
            key=key,
            operation="inpaint",
            credits=credits,
            output_size=img.size,
            work=work,
        )
