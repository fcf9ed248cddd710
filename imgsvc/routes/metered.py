"""The metered call, shared by every operation route:

scope → rate limit → (dry run: quote) → Idempotency-Key → hold credits → run the engine off the
event loop (heartbeating the hold) → capture the charge, or release it if anything failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, TypeVar

import anyio
from fastapi import Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import idempotency, metering
from imgsvc.billing.db import Database
from imgsvc.billing.idempotency import StoredResponse
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import UsageRecord
from imgsvc.billing.pricing import PriceTable
from imgsvc.billing.ratelimit import RateLimiter
from imgsvc.config import Settings
from imgsvc.errors import Forbidden, InvalidInput, PayloadTooLarge
from imgsvc.images import MEDIA_TYPES, Limits, OutputFormat
from imgsvc.models.registry import Operation, Registry

MAX_CLIENT_REF = 100
T = TypeVar("T")
# OpenAPI description of an image response, shared by the operation routes.
IMAGE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {mt: {} for mt in MEDIA_TYPES.values()},
        "description": "The result image. Headers: X-Request-Id, X-Credits-Charged, "
        "X-Credits-Remaining, X-Model, RateLimit, RateLimit-Policy. Send `Idempotency-Key` "
        "to make retries safe and `X-Client-Ref` to tag the usage row.",
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
    media_type: str | None = None  # overrides the format's media type


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


async def request_fingerprint(request: Request) -> str:
    """What makes two requests "the same" for Idempotency-Key: method, path, query and every
    form field (files by content), independent of the multipart boundary or field order."""
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    for k, v in sorted(request.query_params.multi_items()):
        digest.update(f"q:{k}={v}\n".encode())
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        for name, value in sorted(form.multi_items(), key=lambda kv: kv[0]):
            if isinstance(value, str):
                digest.update(f"f:{name}={value}\n".encode())
            else:
                await value.seek(0)
                content = hashlib.sha256(await value.read()).hexdigest()
                digest.update(f"f:{name}=<file {content}>\n".encode())
    else:
        digest.update(await request.body())
    return digest.hexdigest()


async def metered_call(
    request: Request,
    *,
    key: KeyInfo,
    operation: Operation,
    credits: int,
    output_size: tuple[int, int],
    work: Callable[[], EngineResult],
) -> Response:
    """Charge at most `credits` for `work`, only if it succeeds.

    Call it after all validation, with the price and output size known; with `?dry_run=true`
    it answers the quote instead of doing the work.
    """
    state = request.app.state
    settings: Settings = state.settings
    db: Database = state.db
    prices: PriceTable = state.prices
    limiter: RateLimiter = state.rate_limiter
    if not key.may(operation):
        raise Forbidden(f"this key may not call {operation} (scopes: {' '.join(key.scopes)})")
    if limiter.shared:
        rate = await run_in_threadpool(limiter.check, key.id, key.rate_limit)
    else:
        rate = limiter.check(key.id, key.rate_limit)  # in memory: microseconds
    request.state.extra_headers = rate.headers()
    client_ref = request.headers.get("x-client-ref")
    if client_ref is not None and not 0 < len(client_ref) <= MAX_CLIENT_REF:
        raise InvalidInput(f"X-Client-Ref must be 1 to {MAX_CLIENT_REF} characters")

    if getattr(request.state, "dry_run", False):
        quote = {
            "operation": operation,
            "credits": credits,
            "output_width": output_size[0],
            "output_height": output_size[1],
            "price_version": prices.version,
        }
        return JSONResponse(quote, headers={"X-Credits-Would-Charge": str(credits)})

    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None:
        fingerprint = await request_fingerprint(request)
        stored = await run_in_threadpool(
            lambda: idempotency.begin(db, key_id=key.id, idem_key=idem_key, fingerprint=fingerprint)
        )
        if stored is not None:
            return Response(
                stored.body,
                status_code=stored.status,
                media_type=stored.media_type,
                headers={**stored.headers, "Idempotent-Replayed": "true"},
            )

    ttl = timedelta(seconds=settings.hold_ttl_seconds)
    request_id: str = request.state.request_id
    try:
        hold_id = await run_in_threadpool(
            lambda: metering.reserve(
                db,
                key=key,
                credits=credits,
                request_id=request_id,
                ttl=ttl,
                price_version=prices.version,
            )
        )
    except BaseException:
        if idem_key is not None:
            await _shielded(lambda: idempotency.abort(db, key_id=key.id, idem_key=idem_key))
        raise

    def work_then_capture() -> tuple[EngineResult, int, int]:
        # Capturing in the worker thread right after the work saves a thread hop per call.
        started = time.perf_counter()
        result = work()
        usage = UsageRecord(
            operation=operation,
            model=result.model,
            input_size=result.input_size,
            output_size=result.output_size,
            duration_ms=round((time.perf_counter() - started) * 1000),
            price_version=prices.version,
            client_ref=client_ref,
        )
        charged, remaining = metering.capture(
            db,
            hold_id=hold_id,
            credits=credits if result.credits is None else result.credits,
            key=key,
            request_id=request_id,
            usage=usage,
        )
        return result, charged, remaining

    try:
        result, charged, remaining = await _with_heartbeat(
            request.app.state.registry, operation, work_then_capture, db, hold_id, ttl
        )
    except BaseException:
        # A failure, or a client that hung up: give the credits back whatever happens here
        # (a no-op if the capture had already committed).
        await _shielded(lambda: metering.release(db, hold_id=hold_id))
        if idem_key is not None:
            await _shielded(lambda: idempotency.abort(db, key_id=key.id, idem_key=idem_key))
        raise

    headers = {
        "X-Credits-Charged": str(charged),
        "X-Credits-Remaining": str(remaining),
        "X-Model": result.model,
        "X-Width": str(result.output_size[0]),
        "X-Height": str(result.output_size[1]),
        **result.headers,
        **rate.headers(),
    }
    media_type = result.media_type or MEDIA_TYPES[result.format]
    if idem_key is not None:
        stored_response = StoredResponse(200, headers, result.body, media_type)
        await _shielded(
            lambda: idempotency.complete(
                db, key_id=key.id, idem_key=idem_key, response=stored_response
            )
        )
    return Response(result.body, media_type=media_type, headers=headers)


async def _with_heartbeat(
    registry: Registry,
    operation: Operation,
    work: Callable[[], T],
    db: Database,
    hold_id: int,
    ttl: timedelta,
) -> T:
    """Run `work`, extending the hold every ttl/3 so only a dead process lets it expire."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(ttl.total_seconds() / 3)
            await run_in_threadpool(lambda: metering.extend(db, hold_id=hold_id, ttl=ttl))

    heartbeat = asyncio.create_task(beat())
    try:
        return await registry.run(operation, work)
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat


async def _shielded(fn: Callable[[], object]) -> None:
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(fn)
