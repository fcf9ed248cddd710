"""POST /v1.0/removebg — remove.bg's API, so its scripts and plugins only change the base URL.

Same field names, defaults (size=preview, format=auto), `X-Api-Key` header, responses (the
image, or `{"data": {"result_b64", "foreground_*"}}` with `Accept: application/json`) and
headers (`X-Credits-Charged`, `X-Width`, `X-Height`, `X-Type`, `X-Foreground-*`). Errors use
remove.bg's body `{"errors": [{"title", "code"}]}` with our code and request id added.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Request, Response, UploadFile
from fastapi.responses import JSONResponse

from imgsvc.cutout.pipeline import Channels, ResultFormat
from imgsvc.errors import InvalidInput, ServiceError
from imgsvc.models.background.remover import CutoutOptions
from imgsvc.models.registry import DEFAULT_BACKGROUND_MODEL
from imgsvc.routes.deps import ApiKeyDep, LimitsDep, PricesDep, RegistryDep, SettingsDep
from imgsvc.routes.image_input import read_image_and_background
from imgsvc.routes.metered import dry_run_param
from imgsvc.routes.removal import RemovalForm, run_removal
from imgsvc.routes.remove_background import RESPONSES

router = APIRouter(prefix="/v1.0", dependencies=[Depends(dry_run_param)], tags=["remove.bg"])
# remove.bg's `type` values; we do not classify, the header echoes what was asked.
REMOVEBG_TYPES = ("auto", "person", "product", "car", "animal", "graphic", "transportation")


@router.post(
    "/removebg",
    response_class=Response,
    responses=RESPONSES,
    summary="remove.bg-compatible background removal (change only the base URL)",
)
async def removebg(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    settings: SettingsDep,
    image_file: Annotated[UploadFile | None, File()] = None,
    image_file_b64: Annotated[str | None, Form()] = None,
    image_url: Annotated[str | None, Form()] = None,
    size: Annotated[str, Form(description="preview (default) | full | auto | …")] = "preview",
    type: Annotated[str, Form(description="accepted, echoed in X-Type")] = "auto",
    type_level: Annotated[str, Form(description="accepted, ignored")] = "1",
    format: Annotated[ResultFormat, Form()] = "auto",
    roi: Annotated[str, Form()] = "0% 0% 100% 100%",
    crop: Annotated[bool, Form()] = False,
    crop_margin: Annotated[str, Form()] = "0",
    scale: Annotated[str, Form()] = "original",
    position: Annotated[str, Form()] = "original",
    channels: Annotated[Channels, Form()] = "rgba",
    add_shadow: Annotated[bool, Form(description="not supported: ignored, X-Warning")] = False,
    semitransparency: Annotated[bool, Form(description="accepted, ignored")] = True,
    bg_color: Annotated[str | None, Form()] = None,
    bg_image_url: Annotated[str | None, Form()] = None,
    bg_image_file: Annotated[UploadFile | None, File()] = None,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    try:
        if type not in REMOVEBG_TYPES:
            raise InvalidInput(f"type must be one of {', '.join(REMOVEBG_TYPES)}")
        data, background = await read_image_and_background(
            image=(image_file, image_url, image_file_b64),
            background=(bg_image_file, bg_image_url),
            names=("image_file", "image_url", "image_file_b64"),
            bg_names=("bg_image_file", "bg_image_url"),
            limits=limits,
            settings=settings,
        )
        form = RemovalForm(
            model=DEFAULT_BACKGROUND_MODEL,
            size=size,
            format=format,
            channels=channels,
            bg_color=bg_color,
            crop=crop,
            crop_margin=crop_margin,
            scale=scale,
            position=position,
            roi=roi,
            preset=None,
            cutout=CutoutOptions(),
            quality=90,
            default_format="auto",
        )
        extra = {"X-Type": "other" if type == "auto" else type}
        if add_shadow:
            extra["X-Warning"] = "add_shadow is not supported and was ignored"
        return await run_removal(
            request,
            key=key,
            prices=prices,
            registry=registry,
            limits=limits,
            form=form,
            image=data,
            bg_image=background,
            as_json="application/json" in (accept or ""),
            extra_headers=extra,
        )
    except ServiceError as exc:
        return _removebg_error(request, exc)


def _removebg_error(request: Request, exc: ServiceError) -> JSONResponse:
    """remove.bg's error body, with our stable code and the request id."""
    rid = getattr(request.state, "request_id", "")
    body = {"errors": [{"title": exc.message, "code": exc.code, "request_id": rid}]}
    return JSONResponse(body, status_code=exc.status, headers={**exc.headers, "X-Request-Id": rid})
