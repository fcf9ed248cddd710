"""POST /v1.0/removebg — remove.bg's API, so its scripts and plugins only change the base URL.

Same field names, defaults (size=preview, format=auto), `X-Api-Key` header, responses (the
image, or `{"data": {"result_b64", "foreground_*"}}` with `Accept: application/json`) and
headers (`X-Credits-Charged`, `X-Width`, `X-Height`, `X-Type`, `X-Foreground-*`). Every error,
the gate's 401/402/403/429 and form validation included, uses remove.bg's body
`{"errors": [{"title", "code"}]}` with our code and request id added.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from imgsvc.errors import InvalidInput, ServiceError
from imgsvc.operations import remove_background as operation
from imgsvc.operations.cutout.spec import Channels, ResultFormat
from imgsvc.operations.prepared import Result
from imgsvc.routes.deps import SettingsDep
from imgsvc.routes.errors import error_headers, error_status, validation_message
from imgsvc.routes.gate import AdmittedKeyDep, Handler, gated_route
from imgsvc.routes.metered import Respond, dry_run_param, metered_call, read_upload
from imgsvc.routes.remove_background import RESPONSES

log = logging.getLogger("imgsvc")
# remove.bg's `type` values; we do not classify, the header echoes what was asked.
REMOVEBG_TYPES = ("auto", "person", "product", "car", "animal", "graphic", "transportation")


class RemoveBgRoute(gated_route("remove-background")):  # type: ignore[misc]
    """The gated route, answering every error in remove.bg's shape."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                response: Response = await handler(request)
                return response
            except ServiceError as exc:
                return removebg_error(request, exc.message, exc.code, error_status(exc), exc)
            except RequestValidationError as exc:
                message = validation_message(exc.errors())
                return removebg_error(request, message, "invalid_request", 422)
            except HTTPException as exc:
                return removebg_error(
                    request, str(exc.detail), f"http_{exc.status_code}", exc.status_code
                )
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                message = "internal error; quote the request_id"
                return removebg_error(request, message, "internal_error", 500)

        return answer


router = APIRouter(
    prefix="/v1.0",
    dependencies=[Depends(dry_run_param)],
    tags=["remove.bg"],
    route_class=RemoveBgRoute,
)


@router.post(
    "/removebg",
    response_class=Response,
    responses=RESPONSES,
    summary="remove.bg-compatible background removal (change only the base URL)",
)
async def removebg(
    request: Request,
    key: AdmittedKeyDep,
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
    if type not in REMOVEBG_TYPES:
        raise InvalidInput(f"type must be one of {', '.join(REMOVEBG_TYPES)}")
    options = operation.RemoveBackgroundOptions(
        size=size,
        format=format,
        channels=channels,
        bg_color=bg_color,
        crop=crop,
        crop_margin=crop_margin,
        scale=scale,
        position=position,
        roi=roi,
    )
    limit = settings.max_upload_bytes
    inputs = operation.RemoveBackgroundInputs(
        image=None if image_file is None else await read_upload(image_file, limit, "image_file"),
        image_url=image_url,
        image_base64=image_file_b64,
        bg_image=None
        if bg_image_file is None
        else await read_upload(bg_image_file, limit, "bg_image_file"),
        bg_image_url=bg_image_url,
        names=("image_file", "image_url", "image_file_b64"),
        bg_names=("bg_image_file", "bg_image_url"),
    )
    headers = {"X-Type": "other" if type == "auto" else type}
    if add_shadow:
        headers["X-Warning"] = "add_shadow is not supported and was ignored"
    respond = Respond(headers, _removebg_json if "application/json" in (accept or "") else None)
    return await metered_call(
        request, key, lambda ctx: operation.prepare(options, inputs, ctx), respond
    )


def _removebg_json(result: Result) -> tuple[bytes, str]:
    """remove.bg's `Accept: application/json` body."""
    x0, y0, x1, y1 = result.subject_box or (0, 0, 0, 0)
    data = {
        "result_b64": base64.b64encode(result.body).decode("ascii"),
        "foreground_top": y0,
        "foreground_left": x0,
        "foreground_width": x1 - x0,
        "foreground_height": y1 - y0,
    }
    return json.dumps({"data": data}).encode(), "application/json"


def removebg_error(
    request: Request, message: str, code: str, status: int, exc: ServiceError | None = None
) -> JSONResponse:
    """remove.bg's error body, with our stable code and the request id."""
    rid = getattr(request.state, "request_id", "")
    body = {"errors": [{"title": message, "code": code, "request_id": rid}]}
    headers = {**(error_headers(exc) if exc else {}), "X-Request-Id": rid}
    return JSONResponse(body, status_code=status, headers=headers)
