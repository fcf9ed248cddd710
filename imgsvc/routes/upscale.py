"""POST /v1/upscale — super-resolution with Real-ESRGAN (or any installed spandrel model)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.images import OutputFormat
from imgsvc.models.registry import DEFAULT_UPSCALE_MODEL
from imgsvc.routes.deps import ApiKeyDep, LimitsDep, PricesDep, RegistryDep, SettingsDep
from imgsvc.routes.metered import (
    IMAGE_RESPONSES,
    EngineResult,
    dry_run_param,
    metered_call,
    read_upload,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(dry_run_param)], tags=["upscale"])


@router.post(
    "/upscale",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Upscale a photo 2x, 3x or 4x",
)
async def upscale(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, TIFF or BMP")],
    scale: Annotated[int, Form(ge=2, le=4, description="2, 3 or 4: output = input x scale")] = 4,
    model: Annotated[str, Form(description="see GET /v1/models")] = DEFAULT_UPSCALE_MODEL,
    format: Annotated[OutputFormat, Form()] = "png",
    quality: Annotated[int, Form(ge=1, le=100, description="jpg/webp quality")] = 90,
) -> Response:
    data = await read_upload(image, limits, "image")
    img = await run_in_threadpool(images.decode, data, limits)
    out_size = (img.width * scale, img.height * scale)
    if out_size[0] * out_size[1] > settings.max_output_pixels:
        raise InvalidInput(
            f"a {scale}x upscale of {img.width}x{img.height} would be "
            f"{out_size[0]}x{out_size[1]}, over the limit of {settings.max_output_pixels} "
            "output pixels; send a smaller image or a lower scale"
        )
    engine = await run_in_threadpool(registry.upscaler, model)

    def work() -> EngineResult:
        result = engine.upscale(img, out_size)
        body = images.encode(result, format, quality=quality)
        return EngineResult(body, format, engine.name, img.size, out_size)

    return await metered_call(
        request,
        key=key,
        operation="upscale",
        credits=prices.upscale_cost(*out_size),
        output_size=out_size,
        work=work,
    )
