"""POST /v1/upscale — super-resolution with Real-ESRGAN (or any installed spandrel model)."""

from __future__ import annotations

import io
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.images import OutputFormat
from imgsvc.models.registry import DEFAULT_UPSCALE_MODEL
from imgsvc.models.upscale.engine import Upscaler, output_size
from imgsvc.models.upscale.face import FaceEnhancer
from imgsvc.png_stream import PngStreamWriter
from imgsvc.routes.deps import ApiKeyDep, LimitsDep, PricesDep, RegistryDep, SettingsDep
from imgsvc.routes.metered import (
    IMAGE_RESPONSES,
    EngineResult,
    dry_run_param,
    metered_call,
    read_upload,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(dry_run_param)], tags=["upscale"])


def _check_limit(engine: Upscaler, size: tuple[int, int], out: tuple[int, int], limit: int) -> None:
    """Refuse (422, before any work) an output or a native model pass over `limit` pixels."""
    native = (size[0] * engine.scale, size[1] * engine.scale)
    if out[0] * out[1] > limit:
        raise InvalidInput(
            f"upscaling {size[0]}x{size[1]} to {out[0]}x{out[1]} is over the limit of "
            f"{limit} output pixels; send a smaller image or ask for a smaller size"
        )
    if native != out and native[0] * native[1] > limit:
        raise InvalidInput(
            f"{engine.name} works at x{engine.scale}: its pass on {size[0]}x{size[1]} would be "
            f"{native[0]}x{native[1]}, over the limit of {limit} pixels; send a smaller image"
        )


def _streamed_png(engine: Upscaler, img: Image.Image, size: tuple[int, int]) -> bytes:
    """PNG encoded while the tiles come out: the raw output never exists in memory."""
    buf = io.BytesIO()
    writer = PngStreamWriter(buf, size[0], size[1], 4 if img.mode == "RGBA" else 3)
    engine.stream(img, writer)
    writer.close()
    return buf.getvalue()


@router.post(
    "/upscale",
    response_class=Response,
    responses=IMAGE_RESPONSES,
    summary="Upscale (and restore) a photo by any factor from 1 to 8",
    description="The model runs at its native scale in overlapping, feather-blended tiles "
    "(no seams, memory bounded by the tile), then a Lanczos resize gives the exact size asked "
    "for. RGBA stays RGBA. Priced per output megapixel; outputs over "
    "IMGSVC_MAX_OUTPUT_PIXELS are refused (422) before any work, uncharged.",
)
async def upscale(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    settings: SettingsDep,
    image: Annotated[UploadFile, File(description="JPEG, PNG, WebP, GIF, TIFF or BMP")],
    scale: Annotated[
        float | None,
        Form(ge=1, le=8, description="1 to 8, fractions allowed (default 4 without targets)"),
    ] = None,
    target_width: Annotated[
        int | None, Form(ge=1, description="output width; height follows the aspect ratio")
    ] = None,
    target_height: Annotated[
        int | None,
        Form(ge=1, description="output height; with target_width: fit inside both, keep aspect"),
    ] = None,
    model: Annotated[str, Form(description="see GET /v1/models")] = DEFAULT_UPSCALE_MODEL,
    face_enhance: Annotated[
        bool, Form(description="restore faces with GFPGAN (needs weights/face/, else 503)")
    ] = False,
    format: Annotated[OutputFormat, Form()] = "png",
    quality: Annotated[int, Form(ge=1, le=100, description="jpg/webp quality")] = 90,
) -> Response:
    data = await read_upload(image, limits, "image")
    img = await run_in_threadpool(images.decode, data, limits)
    out_size = output_size(
        img.width,
        img.height,
        scale=scale,
        target_width=target_width,
        target_height=target_height,
    )
    engine = await run_in_threadpool(registry.upscaler, model)
    _check_limit(engine, img.size, out_size, settings.max_output_pixels)
    faces: FaceEnhancer | None = None
    if face_enhance:
        faces = await run_in_threadpool(registry.face_enhancer)
    native = (img.width * engine.scale, img.height * engine.scale)

    def work() -> EngineResult:
        if format == "png" and out_size == native and faces is None:
            body = _streamed_png(engine, img, out_size)
        else:
            result = engine.upscale(img, out_size)
            if faces is not None:
                result = faces.enhance(result)
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
