"""POST /v1/remove-background — a cut-out, optionally laid out for a marketplace."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, File, Form, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from imgsvc.fetch import FetchPolicy
from imgsvc.operations import remove_background as operation
from imgsvc.operations.cutout.pipeline import ZIP_MEDIA_TYPE
from imgsvc.operations.sources import one_source
from imgsvc.routes.deps import SettingsDep
from imgsvc.routes.forms import form_fields
from imgsvc.routes.gate import AdmittedKeyDep, operation_router
from imgsvc.routes.jobs import ASYNC_DESCRIPTION, prefers_async, respond_async
from imgsvc.routes.metered import IMAGE_RESPONSES, metered_call, read_upload

router = operation_router("remove-background")
OptionsDep = Annotated[
    operation.RemoveBackgroundOptions, Depends(form_fields(operation.RemoveBackgroundOptions))
]
RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {
            **IMAGE_RESPONSES[200]["content"],  # type: ignore[dict-item]
            ZIP_MEDIA_TYPE: {},
        },
        "description": "The result (image, or a ZIP of color.jpg + alpha.png with format=zip). "
        "Headers: X-Credits-Charged, X-Credits-Remaining, X-Model, X-Model-Version (weights "
        "sha256 prefix), X-Width, X-Height, X-Foreground-Top/-Left/-Width/-Height, "
        "X-Warning (empty or full-frame mask: charged 0), X-Compliance (with a preset).",
    }
}
FORMATS = "JPEG, PNG, WebP, GIF (first frame), TIFF, BMP, HEIC/HEIF or AVIF"


@router.post(
    "/remove-background",
    response_class=Response,
    responses=RESPONSES,
    summary="Remove the background of a photo, optionally laid out for a marketplace",
    description="Send the photo as exactly one of `image`, `image_url` or `image_base64`; "
    "`bg_image` or `bg_image_url` puts the subject on a background. Only useful results are "
    "charged: an empty or full-frame mask costs 0." + ASYNC_DESCRIPTION,
)
async def remove_background(
    request: Request,
    key: AdmittedKeyDep,
    settings: SettingsDep,
    options: OptionsDep,
    image: Annotated[UploadFile | None, File(description=FORMATS)] = None,
    image_url: Annotated[
        str | None, Form(description="http(s) URL of the image (public addresses only)")
    ] = None,
    image_base64: Annotated[str | None, Form(description="the image as base64")] = None,
    bg_image: Annotated[UploadFile | None, File(description="background image")] = None,
    bg_image_url: Annotated[str | None, Form(description="background image URL")] = None,
) -> Response:
    limit = settings.max_upload_bytes
    inputs = operation.RemoveBackgroundInputs(
        image=None if image is None else await read_upload(image, limit, "image"),
        image_url=image_url,
        image_base64=image_base64,
        bg_image=None if bg_image is None else await read_upload(bg_image, limit, "bg_image"),
        bg_image_url=bg_image_url,
    )
    if prefers_async(request) and not request.state.dry_run:
        image_bytes, shared = await run_in_threadpool(
            _sources, options, inputs, request.app.state.context.fetch
        )
        return await respond_async(request, key, operation.OPERATION, options, image_bytes, shared)
    return await metered_call(request, key, lambda ctx: operation.prepare(options, inputs, ctx))


def _sources(
    options: operation.RemoveBackgroundOptions,
    inputs: operation.RemoveBackgroundInputs,
    policy: FetchPolicy,
) -> tuple[bytes, dict[str, bytes]]:
    """The photo's bytes and the background's (fetched when given by URL), for a job."""
    operation.resolve(options, None)  # every option that needs no image, before any fetch
    image = one_source(
        data=inputs.image,
        url=inputs.image_url,
        b64=inputs.image_base64,
        names=inputs.names,
        policy=policy,
    )
    if inputs.bg_image is None and not inputs.bg_image_url:
        return image, {}
    bg = one_source(
        data=inputs.bg_image,
        url=inputs.bg_image_url,
        b64=None,
        names=(*inputs.bg_names, f"{inputs.bg_names[0]}_base64"),
        policy=policy,
    )
    return image, {"bg_image": bg}
