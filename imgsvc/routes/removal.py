"""The background-removal call shared by `/v1/remove-background` and `/v1.0/removebg`:
form fields → validated options → one metered run → image (or remove.bg's JSON) + headers."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

from fastapi import Request, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from imgsvc import images
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.pricing import PriceTable
from imgsvc.cutout import options as opt
from imgsvc.cutout.layout import Layout
from imgsvc.cutout.pipeline import (
    Channels,
    Removal,
    RemovalOptions,
    ResultFormat,
    expected_size,
    remove_background,
)
from imgsvc.cutout.presets import get_preset
from imgsvc.images import Limits
from imgsvc.models.background.remover import CutoutOptions
from imgsvc.models.registry import Registry
from imgsvc.routes.metered import EngineResult, metered_call


@dataclass(frozen=True)
class RemovalForm:
    """The options as sent (strings where remove.bg uses strings)."""

    model: str
    size: str
    format: ResultFormat | None  # None: the preset's, else `default_format`
    channels: Channels
    bg_color: str | None
    crop: bool
    crop_margin: str
    scale: str
    position: str
    roi: str | None
    preset: str | None
    cutout: CutoutOptions
    quality: int
    default_format: ResultFormat


def build_options(form: RemovalForm, img: Image.Image, bg: Image.Image | None) -> RemovalOptions:
    """Validate every option against the decoded image; InvalidInput (422) on the first bad one."""
    preset = get_preset(form.preset) if form.preset else None
    scale = opt.parse_scale(form.scale)
    position = opt.parse_position(form.position)
    bg_color = opt.parse_color(form.bg_color) if form.bg_color else None
    if preset is not None:
        scale = preset.fill if scale is None else scale
        position = position or (0.5, 0.5)
        if bg_color is None and bg is None:
            bg_color = preset.background
    layout = Layout(
        crop=form.crop,
        margin=opt.parse_margin(form.crop_margin),
        scale=scale,
        position=position,
        canvas=preset.canvas if preset else None,
    )
    fmt = form.format or (preset.format if preset else form.default_format)
    return RemovalOptions(
        size=opt.parse_size(form.size),
        format=fmt,
        channels=form.channels,
        bg_color=bg_color,
        bg_image=bg,
        layout=layout,
        roi=opt.parse_roi(form.roi, *img.size) if form.roi else None,
        cutout=form.cutout,
        preset=preset,
        quality=form.quality,
    )


async def run_removal(
    request: Request,
    *,
    key: KeyInfo,
    prices: PriceTable,
    registry: Registry,
    limits: Limits,
    form: RemovalForm,
    image: bytes,
    bg_image: bytes | None,
    as_json: bool = False,
    extra_headers: dict[str, str] | None = None,
) -> Response:
    """Decode, validate, then charge and run; `as_json` answers remove.bg's JSON body."""
    img = await run_in_threadpool(images.decode, image, limits)
    bg = None
    if bg_image is not None:
        bg = await run_in_threadpool(images.decode, bg_image, limits, what="bg_image")
    options = build_options(form, img, bg)
    engine = await run_in_threadpool(registry.background, form.model)

    def work() -> EngineResult:
        result = remove_background(engine, img, options)
        headers = {"X-Model-Version": engine.version, **(extra_headers or {})}
        headers.update(_result_headers(result))
        body, media_type = result.body, result.media_type
        if as_json:
            body, media_type = _removebg_json(result), "application/json"
        return EngineResult(
            body,
            "png" if result.format == "zip" else result.format,
            engine.name,
            img.size,
            result.size,
            headers=headers,
            credits=0 if result.warning else None,
            media_type=media_type,
        )

    return await metered_call(
        request,
        key=key,
        operation="remove-background",
        credits=prices.remove_background_cost(options.size),
        output_size=expected_size(img.size, options),
        work=work,
    )


def _result_headers(result: Removal) -> dict[str, str]:
    headers: dict[str, str] = {}
    if result.subject_box is not None:
        x0, y0, x1, y1 = result.subject_box
        headers |= {
            "X-Foreground-Top": str(y0),
            "X-Foreground-Left": str(x0),
            "X-Foreground-Width": str(x1 - x0),
            "X-Foreground-Height": str(y1 - y0),
        }
    if result.warning:
        headers["X-Warning"] = result.warning
    if result.compliance is not None:
        reasons = ",".join(result.compliance)
        headers["X-Compliance"] = f"fail; reasons={reasons}" if reasons else "pass"
    return headers


def _removebg_json(result: Removal) -> bytes:
    """remove.bg's `Accept: application/json` body."""
    x0, y0, x1, y1 = result.subject_box or (0, 0, 0, 0)
    data = {
        "result_b64": base64.b64encode(result.body).decode("ascii"),
        "foreground_top": y0,
        "foreground_left": x0,
        "foreground_width": x1 - x0,
        "foreground_height": y1 - y0,
    }
    return json.dumps({"data": data}).encode()
