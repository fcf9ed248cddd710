"""create_app(settings): routers, lifespan (database + model loading), errors as JSON."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from anyio import CapacityLimiter
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import __version__
from imgsvc.billing import idempotency, metering
from imgsvc.billing.charge import Meter
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyCache
from imgsvc.billing.ratelimit import RateLimiter
from imgsvc.config import Settings
from imgsvc.errors import ServiceError
from imgsvc.jobs.runtime import JobsRuntime
from imgsvc.models.background.remover import require_onnx_cuda
from imgsvc.models.upscale.cpu import build as kernels
from imgsvc.operations.context import Context
from imgsvc.routes import (
    account,
    admin,
    health,
    inpaint,
    jobs,
    keys,
    quote,
    remove_background,
    removebg_compat,
    upscale,
    web,
)
from imgsvc.routes.deps import new_request_id
from imgsvc.routes.edge import FORM_BYTES, Edge, RoutePolicies
from imgsvc.routes.errors import error_body, error_headers, error_status, validation_message
from imgsvc.routes.metrics import router as metrics_router
from imgsvc.routes.observe import RequestMetrics
from imgsvc.routes.openapi import install as install_openapi

log = logging.getLogger("imgsvc")
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CALL_THREADS = 64
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the application. Raises DeviceUnavailable if IMGSVC_DEVICE=cuda has no GPU."""
    settings = settings or Settings()
    if settings.kernel_cache is not None:
        kernels.use_cache_dir(settings.kernel_cache)
    context = Context.from_settings(settings)
    if settings.device == "cuda":
        require_onnx_cuda()  # background removal would otherwise run on the CPU unnoticed
    registry = context.registry

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(settings.database_url)
        await run_in_threadpool(db.migrate)
        app.state.db = db
        app.state.key_cache = KeyCache(db, settings.key_cache_seconds)
        hold_ttl = timedelta(seconds=settings.hold_ttl_seconds)
        app.state.meter = Meter(db, hold_ttl=hold_ttl)
        # An idempotency claim lives as long as a hold: a call of a process that died frees
        # its Idempotency-Key when its hold would be swept.
        app.state.claims = idempotency.Claims(db, lease=hold_ttl)
        if settings.device == "cuda":
            # Asked for the GPU: create the CUDA sessions before serving, so a provider whose
            # libraries fail to load stops the start instead of running on the CPU unnoticed.
            await run_in_threadpool(registry.background)
        app.state.jobs = JobsRuntime(settings, db, context)
        app.state.jobs.start()
        tasks = [asyncio.create_task(_sweep_forever(db, settings.sweep_interval_seconds))]
        if settings.preload_models:
            tasks.append(asyncio.create_task(_preload(app)))
        else:
            app.state.models_ready = True
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await run_in_threadpool(app.state.jobs.close)
            app.state.meter.close()
            app.state.claims.close()
            db.dispose()

    app = FastAPI(
        title="imgsvc",
        version=__version__,
        summary="Background removal, upscaling and inpainting, metered per API key.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.context = context
    app.state.rate_limiter = RateLimiter(settings.default_rate_limit, settings.redis_url)
    # Threads for charged calls, apart from the default pool the database calls use: a call
    # waiting for its device slot must never keep another request from authenticating.
    app.state.call_threads = CapacityLimiter(CALL_THREADS)
    app.state.models_ready = False
    app.state.load_error = None
    for module in (remove_background, upscale, inpaint, jobs, quote, account, keys, admin, health):
        app.include_router(module.router)
    app.include_router(jobs.reads)
    app.include_router(removebg_compat.router)
    app.include_router(web.router)
    app.include_router(metrics_router)
    raw_limits = {"/v1/jobs": settings.job_max_bytes + FORM_BYTES}
    policies = RoutePolicies(app.routes, settings.max_upload_bytes, raw_limits)
    app.add_middleware(
        Edge,
        policies=policies,
        body_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(RequestMetrics, routes=app.routes)
    app.add_middleware(RequestIds)
    if settings.cors_origins.strip():
        app.add_middleware(CORSMiddleware, **_cors(settings.cors_origins))
    _install_error_handlers(app, policies)
    install_openapi(app)  # /openapi.json documents the errors every route answers
    return app


def _cors(origins: str) -> dict[str, Any]:
    """CORS for the listed origins: the key headers may be sent, our answer headers read."""
    return {
        "allow_origins": [o.strip() for o in origins.split(",") if o.strip()],
        "allow_methods": ["GET", "POST", "DELETE"],
        "allow_headers": [
            "Authorization",
            "X-API-Key",
            "Content-Type",
            "Idempotency-Key",
            "X-Client-Ref",
            "Prefer",
            "X-Request-Id",
        ],
        "expose_headers": [
            "X-Request-Id",
            "X-Credits-Charged",
            "X-Credits-Remaining",
            "X-Credits-Required",
            "Retry-After",
            "RateLimit",
            "RateLimit-Policy",
            "Location",
        ],
        "max_age": 600,
    }


async def _sweep_forever(db: Database, interval: float) -> None:
    """Release holds of calls whose process died; drop expired idempotency records."""
    while True:
        try:
            await run_in_threadpool(metering.sweep_expired, db)
            await run_in_threadpool(idempotency.purge_expired, db)
        except SQLAlchemyError:
            log.exception("hold sweep failed; retrying in %s s", interval)
        await asyncio.sleep(interval)


async def _preload(app: FastAPI) -> None:
    try:
        await run_in_threadpool(app.state.context.registry.preload)
        app.state.models_ready = True
        log.info("models loaded")
    except ServiceError as exc:
        app.state.load_error = exc.message
        log.error("model loading failed: %s", exc.message)
    except Exception as exc:
        app.state.load_error = f"model loading failed: {type(exc).__name__}"
        log.exception("model loading failed")


class RequestIds:
    """Pure ASGI middleware: every request gets an id (the caller's X-Request-Id when it is safe
    to echo), stored in `request.state.request_id` and sent back in `X-Request-Id`, with the
    headers a route left in `request.state.extra_headers` (rate limits, on errors too).

    Pure ASGI rather than `@app.middleware("http")`, so the route sees the server's own
    `receive` and notices a client that hangs up (a charged call then releases its hold)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get("x-request-id", "")
        from_caller = bool(_SAFE_REQUEST_ID.match(incoming))
        state = scope.setdefault("state", {})
        state["request_id"] = incoming if from_caller else new_request_id()
        state["request_id_from_caller"] = from_caller

        started = False

        async def send_with_ids(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = state["request_id"]  # a route may have replaced it
                for name, value in state.get("extra_headers", {}).items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            await self.app(scope, receive, send_with_ids)
        except ClientDisconnect:  # nobody is left to answer
            log.info("client went away: %s %s", scope["method"], scope["path"])
        except Exception:
            # Logged here once (re-raising would have the server log it again), answered as JSON.
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await _send_internal_error(send_with_ids, state["request_id"])


async def _send_internal_error(send: Send, rid: str) -> None:
    body = json.dumps(
        error_body("internal_error", "internal error; quote the request_id", rid)
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error(request: Request, status: int, code: str, message: str, **extra: object) -> JSONResponse:
    rid = getattr(request.state, "request_id", "")
    body = error_body(code, message, rid, **extra)
    return JSONResponse(body, status_code=status, headers={"X-Request-Id": rid})


def _install_error_handlers(app: FastAPI, policies: RoutePolicies) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        status = error_status(exc)
        response = _error(request, status, exc.code, exc.message, **exc.extra)
        response.headers.update(error_headers(exc))
        if status >= 500:
            log.warning("%s %s: %s", status, exc.code, exc.message)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request, 422, "invalid_request", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        response = _error(request, exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # the methods of every router's routes at this path
            response.headers["Allow"] = ", ".join(policies.allowed_methods(request.url.path))
        return response

    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        response = _error(
            request, 503, "database_unavailable", "the database is unavailable; retry shortly"
        )
        response.headers["Retry-After"] = "1"
        return response

    for outage in (OperationalError, InterfaceError, DisconnectionError, PoolTimeout):
        app.add_exception_handler(outage, database_unavailable)
