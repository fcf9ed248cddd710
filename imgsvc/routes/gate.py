"""The gate of a metered route: key, scope, rate limit and X-Client-Ref, from the headers alone,
before the request body is read, fetched or decoded.

FastAPI reads (and spools) a form body before it solves a route's dependencies, so these checks
cannot be ordinary dependencies: they run in the route class's handler, ahead of FastAPI's own.
A refused caller (401, 403, 429) costs no upload, no URL fetch, no decode and no model load.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from imgsvc.billing.keys import KeyCache, KeyInfo
from imgsvc.billing.ratelimit import RateLimiter
from imgsvc.errors import Forbidden, InvalidInput
from imgsvc.models.registry import Operation
from imgsvc.routes.deps import ApiKeyHeader, AuthorizationHeader, api_secret
from imgsvc.routes.errors import rate_headers
from imgsvc.routes.metered import dry_run_param

MAX_CLIENT_REF = 100
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


async def admit_caller(request: Request, operation: Operation | None) -> None:
    """Authenticate, check the scope (unless the operation is in the body: a job's route checks
    it once read), count the call against the key's rate limit."""
    state = request.app.state
    cache: KeyCache = state.key_cache
    secret = api_secret(request.headers.get("authorization"), request.headers.get("x-api-key"))
    key = await run_in_threadpool(cache.authenticate, secret)
    if operation is not None and not key.may(operation):
        raise Forbidden(f"this key may not call {operation} (scopes: {' '.join(key.scopes)})")
    limiter: RateLimiter = state.rate_limiter
    if limiter.shared:
        rate = await run_in_threadpool(limiter.check, key.id, key.rate_limit)
    else:
        rate = limiter.check(key.id, key.rate_limit)  # in memory: microseconds
    request.state.extra_headers = rate_headers(rate)
    client_ref = request.headers.get("x-client-ref")
    if client_ref is not None and not 0 < len(client_ref) <= MAX_CLIENT_REF:
        raise InvalidInput(f"X-Client-Ref must be 1 to {MAX_CLIENT_REF} characters")
    request.state.key = key
    request.state.client_ref = client_ref


def gated_route(operation: Operation | None) -> type[APIRoute]:
    """A route class whose requests pass `admit_caller` before FastAPI reads their body."""

    class GatedRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def gated(request: Request) -> Response:
                await admit_caller(request, operation)
                return await handler(request)

            return gated

    return GatedRoute


def operation_router(operation: Operation, prefix: str = "/v1") -> APIRouter:
    """The router of one metered operation: gated, and documenting `?dry_run=true`."""
    return APIRouter(
        prefix=prefix,
        dependencies=[Depends(dry_run_param)],
        tags=[operation],
        route_class=gated_route(operation),
    )


async def _admitted_key(
    request: Request,
    authorization: AuthorizationHeader = None,
    x_api_key: ApiKeyHeader = None,
) -> KeyInfo:
    """The key the gate admitted (the header parameters are here for the OpenAPI docs)."""
    key: KeyInfo = request.state.key
    return key


AdmittedKeyDep = Annotated[KeyInfo, Depends(_admitted_key)]
