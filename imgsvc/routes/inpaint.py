"""POST /v1/inpaint — erase the masked area, or repaint it from a prompt."""

from __future__ import annotations

import secrets
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.images import OutputFormat
from imgsvc.models import erase
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


@router.post(
    "/inpaint",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Erase an object, or repaint the masked area from a prompt",
)
async def inpaint(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="the photo")],
    mask: Annotated[UploadFile, File(description="same size; white = repaint, black = keep")],
    prompt: Annotated[
        str | None, Form(max_length=MAX_PROMPT_CHARS, description="omit to erase")
    ] = None,
    negative_prompt: Annotated[str | None, Form(max_length=MAX_PROMPT_CHARS)] = None,
    seed: Annotated[int | None, Form(ge=0, le=2**32 - 1, description="echoed in X-Seed")] = None,
    steps: Annotated[int, Form(ge=1, description="denoising steps (prompt only)")] = 30,
    guidance_scale: Annotated[float, Form(ge=0, le=30)] = 7.5,
    strength: Annotated[float, Form(gt=0, le=1)] = 1.0,
    model: Annotated[str | None, Form(description="diffusers pipeline; see /v1/models")] = None,
    format: Annotated[OutputFormat, Form()] = "png",
) -> Response:
    if steps > settings.max_inpaint_steps:
        raise InvalidInput(f"steps must be at most {settings.max_inpaint_steps}")
    img = await run_in_threadpool(images.decode, await read_upload(image, limits, "image"), limits)
    mask_data = await read_upload(mask, limits, "mask")
    hole = await run_in_threadpool(images.decode_mask, mask_data, limits, img.size)
    if not np.any(np.asarray(hole) > 127):
        raise InvalidInput("the mask is empty: paint the area to change in white")

    text = (prompt or "").strip()
    if not text:

        def erase_work() -> EngineResult:
            out = erase.erase(img, hole)
            return EngineResult(images.encode(out, format), format, erase.NAME, img.size, img.size)

        return await metered_call(
            request,
            key=key,
            operation="inpaint",
            credits=prices.inpaint_cost(prompt=False, steps=0, work_pixels=0),
            output_size=img.size,
            work=erase_work,
        )

    engine = await run_in_threadpool(registry.diffusion, model)
    used_seed = seed if seed is not None else secrets.randbelow(2**32)

    def prompt_work() -> EngineResult:
        out = engine.inpaint(
            img,
            hole,
            prompt=text,
            negative_prompt=negative_prompt,
            seed=used_seed,
            steps=steps,
            guidance_scale=guidance_scale,
            strength=strength,
        )
        body = images.encode(out, format)
        headers = {"X-Seed": str(used_seed)}
        return EngineResult(body, format, engine.name, img.size, img.size, headers)

    return await metered_call(
        request,
        key=key,
        operation="inpaint",
        credits=prices.inpaint_cost(
            prompt=True, steps=steps, work_pixels=engine.work_pixels(img.size)
        ),
        output_size=img.size,
        work=prompt_work,
    )
