"""POST /v1/upscale — super-resolution with Real-ESRGAN (or any installed spandrel model)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, File, Request, Response, UploadFile

from imgsvc.operations import upscale as operation
from imgsvc.routes.deps import SettingsDep
from imgsvc.routes.forms import form_fields
from imgsvc.routes.gate import AdmittedKeyDep, operation_router
from imgsvc.routes.jobs import ASYNC_DESCRIPTION, prefers_async, respond_async
from imgsvc.routes.metered import IMAGE_RESPONSES, metered_call, read_upload

router = operation_router("upscale")
OptionsDep = Annotated[operation.UpscaleOptions, Depends(form_fields(operation.UpscaleOptions))]


@router.post(
    "/upscale",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Upscale (and restore) a photo by any factor from 1 to 8",
    description="The model runs at its native scale in overlapping, feather-blended tiles "
    "(no seams, memory bounded by the tile), then a Lanczos resize gives the exact size asked "
    "for. RGBA stays RGBA. Priced per output megapixel; outputs over "
    "IMGSVC_MAX_OUTPUT_PIXELS are refused (422) before any work, uncharged." + ASYNC_DESCRIPTION,
)
async def upscale(
    request: Request,
    key: AdmittedKeyDep,
    settings: SettingsDep,
    options: OptionsDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, TIFF or BMP")],
) -> Response:
    inputs = operation.UpscaleInputs(await read_upload(image, settings.max_upload_bytes, "image"))
    if prefers_async(request) and not request.state.dry_run:
        return await respond_async(request, key, operation.OPERATION, options, inputs.image)
    return await metered_call(request, key, lambda ctx: operation.prepare(options, inputs, ctx))
