"""POST /v1/quote — what a call would cost and produce, without an image and without charge.

The price comes from the operation's own `quote()`, the function its real call prices with.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, StrictBool
from starlette.concurrency import run_in_threadpool

from imgsvc.billing.pricing import BackgroundSize
from imgsvc.errors import PayloadTooLarge
from imgsvc.operations import inpaint, remove_background, upscale
from imgsvc.operations.context import Context
from imgsvc.operations.prepared import Quote as OperationQuote
from imgsvc.routes.deps import NOT_A_BOOLEAN, ApiKeyDep, ContextDep, JsonInt

router = APIRouter(prefix="/v1", tags=["quote"])


class QuoteRequest(BaseModel):
    operation: Literal["remove-background", "upscale", "inpaint"]
    width: JsonInt = Field(ge=1, le=100_000, description="input width in pixels")
    height: JsonInt = Field(ge=1, le=100_000, description="input height in pixels")
    size: BackgroundSize = Field("full", description="remove-background: preview or full")
    scale: float | None = Field(None, ge=1, le=8, description="upscale factor 1-8 (default 4)")
    target_width: Annotated[int, Field(ge=1), NOT_A_BOOLEAN] | None = Field(
        None, description="upscale: output width"
    )
    target_height: Annotated[int, Field(ge=1), NOT_A_BOOLEAN] | None = Field(
        None, description="upscale: output height"
    )
    prompt: StrictBool = Field(False, description="inpaint: with a prompt (else erase)")
    steps: JsonInt = Field(30, ge=1, le=1000, description="inpaint: denoising steps")


class Quote(BaseModel):
    operation: str
    credits: int
    output_width: int
    output_height: int
    price_version: str
    exact: bool = Field(description="false where the model's working size is estimated")


def _quote(body: QuoteRequest, ctx: Context) -> OperationQuote:
    """The operation's own price, after the checks its call makes on an image of this size."""
    w, h = body.width, body.height
    if w * h > ctx.limits.max_pixels:  # the call would refuse the image when decoding it
        raise PayloadTooLarge(
            f"image is {w}x{h} = {w * h} pixels; limit is {ctx.limits.max_pixels}"
        )
    if body.operation == "remove-background":
        return remove_background.quote(
            remove_background.RemoveBackgroundOptions(size=body.size), w, h, ctx
        )
    if body.operation == "upscale":
        options = upscale.UpscaleOptions.model_construct(
            scale=body.scale, target_width=body.target_width, target_height=body.target_height
        )
        return upscale.quote(options, w, h, ctx)
    prompt = "a prompt" if body.prompt else None
    options_inpaint = inpaint.InpaintOptions(prompt=prompt, steps=body.steps)
    return inpaint.quote(options_inpaint, w, h, ctx)


@router.post("/quote", summary="Price of a call before making it (nothing is charged)")
async def quote(body: QuoteRequest, key: ApiKeyDep, ctx: ContextDep) -> Quote:
    priced = await run_in_threadpool(_quote, body, ctx)
    return Quote(
        operation=priced.operation,
        credits=priced.credits,
        output_width=priced.output_size[0],
        output_height=priced.output_size[1],
        price_version=priced.price_version,
        exact=priced.exact,
    )
