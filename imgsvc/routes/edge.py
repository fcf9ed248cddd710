"""The HTTP edge: what is refused from the request line and headers alone, before a route runs
or a byte of the body is read, and the headers every response carries.

- A body longer than its route allows: refused from `Content-Length` (413), or counted as a
  chunked body streams in (413 once the limit is passed; nothing past it is read).
- A call to a route that needs an API key but carries none: 401, whatever the body's size.
- Security headers on every response (`nosniff`, no framing, no referrer).

A route's body limit comes from its declaration: each file field it takes may hold
`max_upload_bytes`, plus `FORM_BYTES` for the other fields; routes that read their body
themselves (a batch job's files) name their limit in `raw_limits`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import anyio
from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc.errors import PayloadTooLarge, RequestTimeout, ServiceError, Unauthorized
from imgsvc.routes.errors import error_body_for, error_status

DRAIN_BYTES = 64 * 1024  # an unread rest up to this is read and dropped, keeping the connection
FORM_BYTES = 1024 * 1024  # form fields and multipart framing beside the files; JSON bodies
KEY_HEADER = "x-api-key"
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
)
# The web page and the API: only our own scripts, styles and connections; never framed.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# The interactive API docs load their scripts from a CDN: only framing is refused there.
DOCS_CSP = "frame-ancestors 'none'"
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})


@dataclass(frozen=True)
class RoutePolicy:
    body_limit: int
    needs_key: bool


DEFAULT_POLICY = RoutePolicy(body_limit=FORM_BYTES, needs_key=False)


def _walk(dependant: Dependant) -> Iterable[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _walk(sub)


def route_policy(route: APIRoute, max_upload_bytes: int, raw_limit: int | None) -> RoutePolicy:
    """The body limit and key requirement a route declares through its parameters."""
    files = 0
    needs_key = False
    for dep in _walk(route.dependant):
        files += sum(isinstance(p.field_info, params.File) for p in dep.body_params)
        needs_key = needs_key or any(p.alias == KEY_HEADER for p in dep.header_params)
    limit = raw_limit if raw_limit is not None else files * max_upload_bytes + FORM_BYTES
    return RoutePolicy(body_limit=limit, needs_key=needs_key)


class RoutePolicies:
    """Each route's policy, looked up for a request by its path and method."""

    def __init__(
        self, routes: Sequence[BaseRoute], max_upload_bytes: int, raw_limits: Mapping[str, int]
    ) -> None:
        self._table: list[tuple[re.Pattern[str], frozenset[str], RoutePolicy]] = []
        for context in iter_route_contexts(routes):
            route = context.original_route
            if isinstance(route, APIRoute) and context.path:
                regex = compile_path(context.path)[0]
                policy = route_policy(route, max_upload_bytes, raw_limits.get(context.path))
                self._table.append((regex, frozenset(context.methods or ()), policy))

    def allowed_methods(self, path: str) -> list[str]:
        """Every method some route takes at `path` (a 405's `Allow`, over all routers)."""
        methods = {m for regex, ms, _ in self._table if regex.match(path) for m in ms}
        return sorted(methods)

    def for_scope(self, scope: Scope) -> RoutePolicy:
        path, method = scope["path"], scope["method"]
        for regex, methods, policy in self._table:
            if method in methods and regex.match(path):
                return policy
        return DEFAULT_POLICY


def _declared_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _has_body(headers: Headers) -> bool:
    return (_declared_length(headers) or 0) > 0 or "transfer-encoding" in headers


def _left_unread(headers: Headers, body: _Body) -> int:
    """Bytes of the body not read yet; a chunked body's rest counts as large."""
    declared = _declared_length(headers)
    return DRAIN_BYTES + 1 if declared is None else declared - body.seen


def _credentials(headers: Headers) -> bool:
    return bool(headers.get(KEY_HEADER) or headers.get("authorization"))


class Edge:
    """Pure ASGI middleware applying `RoutePolicies`, the body's idle deadline and the security
    headers."""

    def __init__(self, app: ASGIApp, policies: RoutePolicies, body_timeout_s: float) -> None:
        self.app = app
        self.policies = policies
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        csp = DOCS_CSP if path in DOCS_PATHS else PAGE_CSP
        state = scope.setdefault("state", {})
        headers = Headers(scope=scope)
        body = _Body(complete=not _has_body(headers))
        replaced = False

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS:
                    out.setdefault(name, value)
                out.setdefault("Content-Security-Policy", csp)
                cut_short = body.cut is not None  # too long or stalled: never read on
                if cut_short or (not body.complete and _left_unread(headers, body) > DRAIN_BYTES):
                    # Answered before a large body was read: the connection is given up rather
                    # than read to its end (a small rest is read and dropped by the server).
                    out["Connection"] = "close"
            await send(message)

        async def send_checked(message: Message) -> None:
            # Once the body was cut short, the app answers a client that seemed to leave:
            # that answer is replaced by the 413 or 408 the client is owed.
            nonlocal replaced
            if body.cut is None:
                await send_secured(message)
            elif not replaced:
                replaced = True
                await _send_error(state, path, send_secured, body.cut)

        policy = self.policies.for_scope(scope)
        refusal = _refusal(headers, policy)
        if refusal is not None:
            await _send_error(state, path, send_secured, refusal)
            return
        counted = _counted(receive, policy.body_limit, self.body_timeout_s, body)
        await self.app(scope, counted, send_checked)
        if body.cut is not None and not replaced:
            await _send_error(state, path, send_secured, body.cut)


@dataclass
class _Body:
    """How far a request's body was read, and why it was cut short (too long, too slow)."""

    complete: bool
    seen: int = 0
    cut: ServiceError | None = None


def _refusal(headers: Headers, policy: RoutePolicy) -> ServiceError | None:
    if policy.needs_key and not _credentials(headers):
        return Unauthorized("send your key as `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    declared = _declared_length(headers)
    if declared is not None and declared > policy.body_limit:
        return PayloadTooLarge(
            f"the request body is {declared} bytes; this route takes at most {policy.body_limit}"
        )
    return None


def _counted(receive: Receive, limit: int, idle_s: float, body: _Body) -> Receive:
    """`receive` that stops a body passing `limit` bytes, or one that stalls for `idle_s`
    seconds before it is complete: the app sees the client leave instead, and `body.cut` says
    why. Once the body is complete, waiting for a disconnect has no deadline."""

    async def receive_counted() -> Message:
        if body.cut is not None:
            return {"type": "http.disconnect"}
        if body.complete:
            return await receive()
        try:
            with anyio.fail_after(idle_s):
                message = await receive()
        except TimeoutError:
            body.cut = RequestTimeout(f"no byte of the request body came for {idle_s:g} s")
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            body.seen += len(message.get("body", b""))
            body.complete = not message.get("more_body", False)
            if body.seen > limit:
                body.cut = PayloadTooLarge(
                    f"the request body passed this route's limit of {limit} bytes"
                )
                return {"type": "http.disconnect"}
        return message

    return receive_counted


async def _send_error(state: dict[str, object], path: str, send: Send, exc: ServiceError) -> None:
    rid = str(state.get("request_id", ""))
    body = json.dumps(error_body_for(path, exc.code, exc.message, rid)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": error_status(exc), "headers": headers})
    await send({"type": "http.response.body", "body": body})
