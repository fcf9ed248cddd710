"""POST /v1/remove-background — a cut-out with the background made transparent."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from imgsvc import images
from imgsvc.images import OutputFormat
from imgsvc.models.registry import DEFAULT_BACKGROUND_MODEL
from imgsvc.routes.deps import ApiKeyDep, LimitsDep, PricesDep, RegistryDep
from imgsvc.routes.metered import (
    IMAGE_RESPONSES,
    EngineResult,
    dry_run_param,
    metered_call,
    read_upload,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(dry_run_param)], tags=["remove-background"])


@router.post(
    "/remove-background",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Remove the background of a photo",
)
async def remove_background(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, TIFF or BMP")],
    model: Annotated[str, Form(description="rembg model with weights installed")] = (
        DEFAULT_BACKGROUND_MODEL
    ),
    format: Annotated[OutputFormat, Form(description="png | webp keep alpha; jpg is on white")] = (
        "png"
    ),
) -> Response:
    data = await read_upload(image, limits, "image")
    img = await run_in_threadpool(images.decode, data, limits)
    engine = await run_in_threadpool(registry.background, model)

    def work() -> EngineResult:
        cutout = engine.remove(img)
        return EngineResult(images.encode(cutout, format), format, engine.name, img.size, img.size)

    return await metered_call(
        request,
        key=key,
        operation="remove-background",
        credits=prices.remove_background_cost("full"),
        output_size=img.size,
        work=work,
    )
