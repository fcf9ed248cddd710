"""Per-request metrics and the one log line of every request (pure ASGI middleware).

The route label is the matched route's template (`/v1/jobs/{job_id}`), never the raw path, so
the metrics' label sets stay bounded; a path no route matches is `unmatched`. The model and the
credits come from the response's `X-Model` and `X-Credits-Charged` (an idempotent replay
charges nothing), the key id from the gate's `request.state.key`. Secrets never reach the line.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imgsvc import metrics

log = logging.getLogger("imgsvc.access")
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """Count and time every HTTP request, and log it once when its response has ended.

    `routes` (the app's) name the route of a request answered before routing (a refusal at the
    edge: body too large, no key)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self._templates: list[tuple[re.Pattern[str], str]] = [
            (compile_path(context.path)[0], context.path)
            for context in iter_route_contexts(routes)
            if context.path
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        response: dict[str, Any] = {"status": 500, "headers": Headers()}

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["headers"] = Headers(raw=message.get("headers", []))
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:  # an unhandled error is answered 500 by the outermost handler, after this
            route = self._route(scope)
            _record(scope, route, response["status"], response["headers"], started)

    def _route(self, scope: Scope) -> str:
        """The template of the route that served the request (or would have)."""
        path = getattr(scope.get("route"), "path", None)
        if isinstance(path, str):
            return path
        for regex, template in self._templates:
            if regex.match(scope["path"]):
                return template
        return UNMATCHED


def _record(scope: Scope, route: str, status: int, headers: Headers, started: float) -> None:
    seconds = time.perf_counter() - started
    method = scope["method"] if scope["method"] in _METHODS else "other"
    model = headers.get("x-model", "")
    replayed = headers.get("idempotent-replayed") == "true"
    credits = 0 if replayed else _int(headers.get("x-credits-charged"))
    metrics.REQUESTS.labels(route, method, str(status), model).inc()
    metrics.REQUEST_SECONDS.labels(route, method).observe(seconds)
    state = scope.get("state", {})
    key = state.get("key")
    fields = {
        "request_id": state.get("request_id", ""),
        "key_id": getattr(key, "id", None),
        "method": method,
        "route": route,
        "path": scope.get("path", ""),
        "status": status,
        "model": model or None,
        "duration_ms": round(seconds * 1000, 1),
        "credits": credits,
    }
    log.info(
        "%s %s %s %d %.1f ms key=%s model=%s credits=%d",
        fields["request_id"],
        method,
        fields["path"],
        status,
        fields["duration_ms"],
        fields["key_id"],
        fields["model"],
        credits,
        extra=fields,
    )


def _int(value: str | None) -> int:
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0
