"""Background removal: a cut-out with rembg, optionally laid out for a marketplace.

Options use remove.bg's names and string forms (`crop_margin="10%"`, `bg_color="#81d4fa80"`,
`roi="0% 0% 100% 50%"`); the remove.bg-compatible route maps its own field names onto the
same model. Only useful results are charged: an empty or full-frame mask costs 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from PIL import Image
from pydantic import BaseModel, Field

from imgsvc import images
from imgsvc.models.background.remover import BackgroundRemover
from imgsvc.models.registry import DEFAULT_BACKGROUND_MODEL, Operation
from imgsvc.operations.context import Context
from imgsvc.operations.cutout import options as parse
from imgsvc.operations.cutout.pipeline import expected_size, remove_background
from imgsvc.operations.cutout.presets import PresetName, get_preset
from imgsvc.operations.cutout.spec import Channels, CutoutSpec, ResultFormat
from imgsvc.operations.prepared import Prepared, Quote, Result
from imgsvc.operations.sources import one_source

OPERATION: Operation = "remove-background"


class RemoveBackgroundOptions(BaseModel):
    """Everything a cut-out can be asked for, besides its images."""

    model: str = Field(DEFAULT_BACKGROUND_MODEL, description="rembg model with weights installed")
    size: str = Field("full", description="preview (≤0.25 MP, cheaper) | full | auto (= full)")
    format: ResultFormat | None = Field(
        None,
        description="png | webp | jpg | zip | auto (jpg if opaque); default png, or the preset's",
    )
    channels: Channels = Field("rgba", description="rgba, or alpha (the matte only)")
    bg_color: str | None = Field(None, description="hex (81d4fa, #81d4fa80) or a colour name")
    crop: bool = Field(False, description="trim to the subject")
    crop_margin: str = Field(
        "0", description="margin around the cropped subject: 1, 2 or 4 of 30px / 10%"
    )
    scale: str = Field(
        "original", description="original, or 10%..100%: the subject's share of the canvas"
    )
    position: str = Field(
        "original", description="original | center | 'x%' | 'x% y%' (0% = left/top)"
    )
    roi: str | None = Field(
        None, description="x1 y1 x2 y2 (px or %): only this region can be subject"
    )
    preset: PresetName | None = Field(None, description="marketplace layout + X-Compliance check")
    alpha_matting: bool = Field(False, description="refine soft edges (slow)")
    alpha_matting_foreground_threshold: int = Field(240, ge=0, le=255)
    alpha_matting_background_threshold: int = Field(10, ge=0, le=255)
    alpha_matting_erode_size: int = Field(10, ge=0, le=100)
    post_process_mask: bool = Field(False, description="smooth the mask (rembg ppm)")
    decontaminate: bool = Field(
        False, description="recover edge colours: no fringe over a new background"
    )
    quality: int = Field(90, ge=1, le=100, description="jpg/webp quality")


@dataclass(frozen=True)
class RemoveBackgroundInputs:
    """The subject image as exactly one of bytes, URL or base64; an optional background."""

    image: bytes | None = None
    image_url: str | None = None
    image_base64: str | None = None
    bg_image: bytes | None = None
    bg_image_url: str | None = None
    # Field names for error messages (the remove.bg route calls them image_file, …).
    names: tuple[str, str, str] = ("image", "image_url", "image_base64")
    bg_names: tuple[str, str] = ("bg_image", "bg_image_url")


def resolve(
    options: RemoveBackgroundOptions,
    size: tuple[int, int] | None,
    bg_image: Image.Image | None = None,
) -> CutoutSpec:
    """The options as numbers for an image of `size` (InvalidInput on the first bad one);
    without a size, everything but the ROI (which needs the image's size)."""
    preset = get_preset(options.preset) if options.preset else None
    scale = parse.parse_scale(options.scale)
    position = parse.parse_position(options.position)
    bg_color = parse.parse_color(options.bg_color) if options.bg_color else None
    if preset is not None:
        scale = preset.fill if scale is None else scale
        position = position or (0.5, 0.5)
        if bg_color is None and bg_image is None:
            bg_color = preset.background
    return CutoutSpec(
        size=parse.parse_size(options.size),
        format=options.format or (preset.format if preset else "png"),
        channels=options.channels,
        bg_color=bg_color,
        bg_image=bg_image,
        crop=options.crop,
        margin=parse.parse_margin(options.crop_margin),
        scale=scale,
        position=position,
        canvas=preset.canvas if preset else None,
        roi=parse.parse_roi(options.roi, *size) if options.roi and size else None,
        preset=preset,
        quality=options.quality,
        post_process_mask=options.post_process_mask,
        alpha_matting=options.alpha_matting,
        foreground_threshold=options.alpha_matting_foreground_threshold,
        background_threshold=options.alpha_matting_background_threshold,
        erode_size=options.alpha_matting_erode_size,
        decontaminate=options.decontaminate,
    )


def quote(options: RemoveBackgroundOptions, width: int, height: int, ctx: Context) -> Quote:
    spec = resolve(options, (width, height))
    credits = ctx.prices.remove_background_cost(spec.size)
    return Quote(OPERATION, credits, expected_size((width, height), spec), ctx.prices.version)


def prepare(
    options: RemoveBackgroundOptions, inputs: RemoveBackgroundInputs, ctx: Context
) -> Prepared:
    resolve(options, None)  # every option that needs no image is checked before any fetch
    data = one_source(
        data=inputs.image,
        url=inputs.image_url,
        b64=inputs.image_base64,
        names=inputs.names,
        policy=ctx.fetch,
    )
    bg_data = None
    if inputs.bg_image is not None or inputs.bg_image_url:
        bg_data = one_source(
            data=inputs.bg_image,
            url=inputs.bg_image_url,
            b64=None,
            names=(*inputs.bg_names, f"{inputs.bg_names[0]}_base64"),
            policy=ctx.fetch,
        )
    img = images.decode(data, ctx.limits)
    bg = None if bg_data is None else images.decode(bg_data, ctx.limits, what="bg_image")
    spec = resolve(options, img.size, bg)
    priced = quote(options, *img.size, ctx)  # the price a quote gives, by construction
    engine = ctx.registry.background(options.model)
    return Prepared(priced, engine.name, img.size, partial(_run, engine, img, spec))


def _run(engine: BackgroundRemover, img: Image.Image, spec: CutoutSpec) -> Result:
    removal = remove_background(engine, img, spec)
    return Result(
        body=removal.body,
        media_type=removal.media_type,
        model=engine.name,
        input_size=img.size,
        output_size=removal.size,
        credits=0 if removal.warning else None,
        model_version=engine.version,
        subject_box=removal.subject_box,
        warning=removal.warning,
        compliance=None if removal.compliance is None else tuple(removal.compliance),
    )
