"""POST /v1/quote — what a call would cost and produce, without an image and without charge."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from imgsvc.billing.pricing import BackgroundSize
from imgsvc.models.upscale.engine import output_size
from imgsvc.routes.deps import ApiKeyDep, PricesDep

router = APIRouter(prefix="/v1", tags=["quote"])
SD15_NATIVE_PIXELS = 512 * 512


class QuoteRequest(BaseModel):
    operation: Literal["remove-background", "upscale", "inpaint"]
    width: int = Field(ge=1, le=100_000, description="input width in pixels")
    height: int = Field(ge=1, le=100_000, description="input height in pixels")
    size: BackgroundSize = Field("full", description="remove-background: preview or full")
    scale: float | None = Field(None, description="upscale factor 1-8 (default 4)")
    target_width: int | None = Field(None, ge=1, description="upscale: output width")
    target_height: int | None = Field(None, ge=1, description="upscale: output height")
    prompt: bool = Field(False, description="inpaint: with a prompt (else erase)")
    steps: int = Field(30, ge=1, le=1000, description="inpaint: denoising steps")


class Quote(BaseModel):
    operation: str
    credits: int
    output_width: int
    output_height: int
    price_version: str
    exact: bool = Field(description="false where the model's working size is estimated")


@router.post("/quote", summary="Price of a call before making it (nothing is charged)")
async def quote(body: QuoteRequest, key: ApiKeyDep, prices: PricesDep) -> Quote:
    w, h, exact = body.width, body.height, True
    if body.operation == "remove-background":
        credits = prices.remove_background_cost(body.size)
    elif body.operation == "upscale":
        w, h = output_size(
            body.width,
            body.height,
            scale=body.scale,
            target_width=body.target_width,
            target_height=body.target_height,
        )
        credits = prices.upscale_cost(w, h)
    else:
        # The pipeline works on at most its native size (512x512 for SD 1.5); `dry_run=true`
        # on the real call gives the exact figure for the installed model and the mask.
        work_pixels = min(body.width * body.height, SD15_NATIVE_PIXELS)
        credits = prices.inpaint_cost(prompt=body.prompt, steps=body.steps, work_pixels=work_pixels)
        exact = not body.prompt
    return Quote(
        operation=body.operation,
        credits=credits,
        output_width=w,
        output_height=h,
        price_version=prices.version,
        exact=exact,
    )
