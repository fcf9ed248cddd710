"""Upscaling (and restoration) by any factor from 1 to 8 with a spandrel model.

The model runs at its native scale in tiles; a Lanczos resize then gives the exact size asked
for. Priced per output megapixel; an output (or the model's native pass) over the output pixel
limit is refused before any work.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import partial

from PIL import Image
from pydantic import BaseModel, Field

from imgsvc import images
from imgsvc.errors import InvalidInput
from imgsvc.images import OutputFormat
from imgsvc.models.registry import DEFAULT_UPSCALE_MODEL, Operation
from imgsvc.models.upscale.engine import Upscaler, output_size
from imgsvc.models.upscale.face import FaceEnhancer
from imgsvc.operations.context import Context
from imgsvc.operations.prepared import Prepared, Quote, Result
from imgsvc.png_stream import PngStreamWriter

OPERATION: Operation = "upscale"


class UpscaleOptions(BaseModel):
    scale: float | None = Field(
        None, ge=1, le=8, description="1 to 8, fractions allowed (default 4 without targets)"
    )
    target_width: int | None = Field(
        None, ge=1, description="output width; height follows the aspect ratio"
    )
    target_height: int | None = Field(
        None, ge=1, description="output height; with target_width: fit inside both, keep aspect"
    )
    model: str = Field(DEFAULT_UPSCALE_MODEL, description="see GET /v1/models")
    face_enhance: bool = Field(
        False, description="restore faces with GFPGAN (needs weights/face/, else 503)"
    )
    format: OutputFormat = "png"
    quality: int = Field(90, ge=1, le=100, description="jpg/webp quality")


@dataclass(frozen=True)
class UpscaleInputs:
    image: bytes


def _output(options: UpscaleOptions, size: tuple[int, int], limit: int) -> tuple[int, int]:
    """The exact output size asked for, refused (InvalidInput) over `limit` pixels."""
    out = output_size(
        *size,
        scale=options.scale,
        target_width=options.target_width,
        target_height=options.target_height,
    )
    if out[0] * out[1] > limit:
        raise InvalidInput(
            f"upscaling {size[0]}x{size[1]} to {out[0]}x{out[1]} is over the limit of "
            f"{limit} output pixels; send a smaller image or ask for a smaller size"
        )
    return out


def _check_native_pass(
    engine: Upscaler, size: tuple[int, int], out: tuple[int, int], limit: int
) -> None:
    native = engine.native_size(size)
    if native != out and native[0] * native[1] > limit:
        raise InvalidInput(
            f"{engine.name} works at x{engine.scale}: its pass on {size[0]}x{size[1]} would be "
            f"{native[0]}x{native[1]}, over the limit of {limit} pixels; send a smaller image"
        )


def quote(options: UpscaleOptions, width: int, height: int, ctx: Context) -> Quote:
    out = _output(options, (width, height), ctx.max_output_pixels)
    return Quote(OPERATION, ctx.prices.upscale_cost(*out), out, ctx.prices.version)


def prepare(options: UpscaleOptions, inputs: UpscaleInputs, ctx: Context) -> Prepared:
    img = images.decode(inputs.image, ctx.limits)
    priced = quote(options, *img.size, ctx)  # the price a quote gives, by construction
    images.check_encodable(priced.output_size, options.format)
    engine = ctx.registry.upscaler(options.model)
    _check_native_pass(engine, img.size, priced.output_size, ctx.max_output_pixels)
    faces = ctx.registry.face_enhancer() if options.face_enhance else None
    work = partial(_run, engine, faces, img, priced.output_size, options)
    return Prepared(priced, engine.name, img.size, work)


def _run(
    engine: Upscaler,
    faces: FaceEnhancer | None,
    img: Image.Image,
    out: tuple[int, int],
    options: UpscaleOptions,
) -> Result:
    if options.format == "png" and out == engine.native_size(img.size) and faces is None:
        body = _streamed_png(engine, img, out)
    else:
        result = engine.upscale(img, out)
        if faces is not None:
            result = faces.enhance(result)
        body = images.encode(result, options.format, quality=options.quality)
    return Result(body, images.MEDIA_TYPES[options.format], engine.name, img.size, out)


def _streamed_png(engine: Upscaler, img: Image.Image, size: tuple[int, int]) -> bytes:
    """PNG encoded while the tiles come out: the raw output never exists in memory."""
    buf = io.BytesIO()
    writer = PngStreamWriter(buf, size[0], size[1], 4 if img.mode == "RGBA" else 3)
    engine.stream(img, writer)
    writer.close()
    return buf.getvalue()
