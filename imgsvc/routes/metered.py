"""The metered call: reserve credits → run the engine off the event loop → capture or release."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

import anyio
from fastapi import Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import metering
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import UsageRecord
from imgsvc.billing.pricing import PriceTable
from imgsvc.errors import PayloadTooLarge
from imgsvc.images import MEDIA_TYPES, Limits, OutputFormat
from imgsvc.models.registry import Operation, Registry

# OpenAPI description of an image response, shared by the operation routes.
IMAGE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {mt: {} for mt in MEDIA_TYPES.values()},
        "description": "The result image. Headers: X-Request-Id, X-Credits-Charged, "
        "X-Credits-Remaining, X-Model.",
    }
}


@dataclass(frozen=True)
class EngineResult:
    """What an operation produced, ready to send."""

    body: bytes
    format: OutputFormat
    model: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    headers: dict[str, str] = field(default_factory=dict)
    # Credits to charge when they differ from the reservation (e.g. 0 for a useless result).
    credits: int | None = None


async def read_upload(upload: UploadFile, limits: Limits, what: str) -> bytes:
    """Read an uploaded file, refusing oversize ones before reading them into memory."""
    if upload.size is not None and upload.size > limits.max_bytes:
        raise PayloadTooLarge(f"{what} is {upload.size} bytes; the limit is {limits.max_bytes}")
    return await upload.read()


async def dry_run_param(
    request: Request,
    dry_run: Annotated[
        bool, Query(description="quote only: return the price and output size, charge nothing")
    ] = False,
) -> None:
    """Router-level dependency of every metered operation (documents `?dry_run=true`)."""
    request.state.dry_run = dry_run


async def metered_call(
    request: Request,
    *,
    key: KeyInfo,
    operation: Operation,
    credits: int,
    output_size: tuple[int, int],
    work: Callable[[], EngineResult],
) -> Response:
    """Charge `credits` for `work` only if it succeeds; a failure releases the reservation.

    Call it after all validation, with the price and output size known; with `?dry_run=true`
    it answers the quote instead of doing the work.
    """
    prices: PriceTable = request.app.state.prices
    if getattr(request.state, "dry_run", False):
        quote = {
            "operation": operation,
            "credits": credits,
            "output_width": output_size[0],
            "output_height": output_size[1],
            "price_version": prices.version,
        }
        return JSONResponse(quote, headers={"X-Credits-Would-Charge": str(credits)})
    db: Database = request.app.state.db
    registry: Registry = request.app.state.registry
    request_id: str = request.state.request_id
    await run_in_threadpool(
        metering.reserve, db, key_id=key.id, credits=credits, request_id=request_id
    )
    started = time.perf_counter()
    try:
        result = await registry.run(operation, work)
    except BaseException:
        with anyio.CancelScope(shield=True):  # a client that hangs up still gets refunded
            await run_in_threadpool(
                metering.release,
                db,
                key_id=key.id,
                credits=credits,
                request_id=request_id,
            )
        raise
    usage = UsageRecord(
        operation=operation,
        model=result.model,
        input_size=result.input_size,
        output_size=result.output_size,
        duration_ms=round((time.perf_counter() - started) * 1000),
    )
    remaining = await run_in_threadpool(
        metering.capture,
        db,
        key_id=key.id,
        credits=credits,
        request_id=request_id,
        usage=usage,
    )
    headers = {
        "X-Credits-Charged": str(credits),
        "X-Credits-Remaining": str(remaining),
        "X-Model": result.model,
        "X-Width": str(result.output_size[0]),
        "X-Height": str(result.output_size[1]),
        **result.headers,
    }
    return Response(result.body, media_type=MEDIA_TYPES[result.format], headers=headers)
