"""POST /v1/inpaint — erase the masked area, or repaint it from a prompt."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, File, Request, Response, UploadFile

from imgsvc.operations import inpaint as operation
from imgsvc.routes.deps import SettingsDep
from imgsvc.routes.forms import form_fields
from imgsvc.routes.gate import AdmittedKeyDep, operation_router
from imgsvc.routes.jobs import ASYNC_DESCRIPTION, prefers_async, respond_async
from imgsvc.routes.metered import IMAGE_RESPONSES, metered_call, read_upload

router = operation_router("inpaint")
OptionsDep = Annotated[operation.InpaintOptions, Depends(form_fields(operation.InpaintOptions))]
MASK = (
    "same size as the image; white = repaint, black = keep. Without `mask` and `mask_boxes`, "
    "the image's transparent pixels are repainted (the result is then opaque)"
)


@router.post(
    "/inpaint",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Erase an object, or repaint the masked area from a prompt",
    description="Only a padded crop around the mask is processed (at the model's native "
    "resolution) and blended back with the grown and feathered mask: every pixel farther than "
    "`grow_mask + mask_blur` from the mask is returned bit-identical. Without `prompt` the area "
    "is erased (LaMa when installed, else OpenCV Telea); `X-Model` names the engine. When the "
    "device queue is full the answer is 503 `queue_full` with `Retry-After`, uncharged."
    + ASYNC_DESCRIPTION,
)
async def inpaint(
    request: Request,
    key: AdmittedKeyDep,
    settings: SettingsDep,
    options: OptionsDep,
    image: Annotated[UploadFile, File(description="the photo (RGBA: see `mask`)")],
    mask: Annotated[UploadFile | None, File(description=MASK)] = None,
) -> Response:
    limit = settings.max_upload_bytes
    inputs = operation.InpaintInputs(
        image=await read_upload(image, limit, "image"),
        mask=None if mask is None else await read_upload(mask, limit, "mask"),
    )
    if prefers_async(request) and not request.state.dry_run:
        shared = {} if inputs.mask is None else {"mask": inputs.mask}
        return await respond_async(request, key, operation.OPERATION, options, inputs.image, shared)
    return await metered_call(request, key, lambda ctx: operation.prepare(options, inputs, ctx))
