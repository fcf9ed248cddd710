"""POST /v1/remove-background — a cut-out, optionally laid out for a marketplace."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile

from imgsvc.cutout.pipeline import ZIP_MEDIA_TYPE, Channels, ResultFormat
from imgsvc.cutout.presets import PresetName
from imgsvc.models.background.remover import CutoutOptions
from imgsvc.models.registry import DEFAULT_BACKGROUND_MODEL
from imgsvc.routes.deps import ApiKeyDep, LimitsDep, PricesDep, RegistryDep, SettingsDep
from imgsvc.routes.image_input import read_image_and_background
from imgsvc.routes.metered import IMAGE_RESPONSES, dry_run_param
from imgsvc.routes.removal import RemovalForm, run_removal

router = APIRouter(prefix="/v1", dependencies=[Depends(dry_run_param)], tags=["remove-background"])

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
)
async def remove_background(
    request: Request,
    key: ApiKeyDep,
    prices: PricesDep,
    registry: RegistryDep,
    limits: LimitsDep,
    settings: SettingsDep,
    image: Annotated[UploadFile | None, File(description=FORMATS)] = None,
    image_url: Annotated[
        str | None, Form(description="http(s) URL of the image (public addresses only)")
    ] = None,
    image_base64: Annotated[str | None, Form(description="the image as base64")] = None,
    model: Annotated[str, Form(description="rembg model with weights installed")] = (
        DEFAULT_BACKGROUND_MODEL
    ),
    size: Annotated[
        str, Form(description="preview (≤0.25 MP, cheaper) | full | auto (= full)")
    ] = "full",
    format: Annotated[
        ResultFormat | None,
        Form(
            description="png | webp | jpg | zip | auto (jpg if opaque); default png, "
            "or the preset's"
        ),
    ] = None,
    channels: Annotated[Channels, Form(description="rgba, or alpha (the matte only)")] = "rgba",
    bg_color: Annotated[
        str | None, Form(description="hex (81d4fa, #81d4fa80) or a colour name")
    ] = None,
    bg_image: Annotated[UploadFile | None, File(description="background image")] = None,
    bg_image_url: Annotated[str | None, Form(description="background image URL")] = None,
    crop: Annotated[bool, Form(description="trim to the subject")] = False,
    crop_margin: Annotated[
        str, Form(description="margin around the cropped subject: 1, 2 or 4 of 30px / 10%")
    ] = "0",
    scale: Annotated[
        str, Form(description="original, or 10%..100%: the subject's share of the canvas")
    ] = "original",
    position: Annotated[
        str, Form(description="original | center | 'x%' | 'x% y%' (0% = left/top)")
    ] = "original",
    roi: Annotated[
        str | None, Form(description="x1 y1 x2 y2 (px or %): only this region can be subject")
    ] = None,
    preset: Annotated[
        PresetName | None, Form(description="marketplace layout + X-Compliance check")
    ] = None,
    alpha_matting: Annotated[bool, Form(description="refine soft edges (slow)")] = False,
    alpha_matting_foreground_threshold: Annotated[int, Form(ge=0, le=255)] = 240,
    alpha_matting_background_threshold: Annotated[int, Form(ge=0, le=255)] = 10,
    alpha_matting_erode_size: Annotated[int, Form(ge=0, le=100)] = 10,
    post_process_mask: Annotated[bool, Form(description="smooth the mask (rembg ppm)")] = False,
    decontaminate: Annotated[
        bool, Form(description="recover edge colours: no fringe over a new background")
    ] = False,
    quality: Annotated[int, Form(ge=1, le=100, description="jpg/webp quality")] = 90,
) -> Response:
    data, background = await read_image_and_background(
        image=(image, image_url, image_base64),
        background=(bg_image, bg_image_url),
        names=("image", "image_url", "image_base64"),
        bg_names=("bg_image", "bg_image_url"),
        limits=limits,
        settings=settings,
    )
    form = RemovalForm(
        model=model,
        size=size,
        format=format,
        channels=channels,
        bg_color=bg_color,
        crop=crop,
        crop_margin=crop_margin,
        scale=scale,
        position=position,
        roi=roi,
        preset=preset,
        cutout=CutoutOptions(
            post_process_mask=post_process_mask,
            alpha_matting=alpha_matting,
            alpha_matting_foreground_threshold=alpha_matting_foreground_threshold,
            alpha_matting_background_threshold=alpha_matting_background_threshold,
            alpha_matting_erode_size=alpha_matting_erode_size,
            decontaminate=decontaminate,
        ),
        quality=quality,
        default_format="png",
    )
    return await run_removal(
        request,
        key=key,
        prices=prices,
        registry=registry,
        limits=limits,
        form=form,
        image=data,
        bg_image=background,
    )
