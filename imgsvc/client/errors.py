"""The service's error answers as exceptions: one class per kind, all carrying the same facts.

Every error answer of imgsvc is `{"error": {"code", "message", "request_id", ...}}`; an
`ApiError` keeps those (and any further fields in `details`), the HTTP status and the
`Retry-After` the service sent. A call that got no answer at all raises `ApiConnectionError`
(status 0). The API key never appears in an exception: messages and details are masked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from imgsvc.client.retry import parse_retry_after

IN_PROGRESS_CODE = "idempotency_in_progress"


class ApiError(Exception):
    """An error answer of the service, or no answer at all (`status` 0)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        details: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, code, message, request_id)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (request id {self.request_id})" if self.request_id else ""
        status = f"HTTP {self.status} " if self.status else ""
        return f"{status}{self.code}: {self.message}{where}"


class ApiConnectionError(ApiError):
    """No answer: refused connection, timeout, broken connection (after the retries)."""


class InvalidResponse(ApiError):
    """The service answered something this client cannot read (not the documented body)."""


class InvalidRequest(ApiError):
    """4xx: a bad option, image, mask or field (422 mostly); what to fix is in `message`."""


class PayloadTooLarge(InvalidRequest):
    """413: an upload, image or job over the service's limits."""


class UnsupportedMediaType(InvalidRequest):
    """415: not an image, or a format the service does not read."""


class AuthenticationError(ApiError):
    """401: missing, malformed, unknown, expired or revoked key."""


class InsufficientCredits(ApiError):
    """402: the balance (or a sub-key's monthly cap) is below the call's price.

    `details` has `credits_required` (and `credits_remaining` when the balance is short)."""


class PermissionDenied(ApiError):
    """403: the key's scopes do not include this operation (or `keys:children`)."""


class NotFound(ApiError):
    """404: unknown path, job (or another key's), sub-key."""


class Conflict(ApiError):
    """409: a job's result asked for before it finished, or an Idempotency-Key still running."""


class RateLimited(ApiError):
    """429: the key's rate limit; `retry_after` says when to come back."""


class ServerError(ApiError):
    """5xx: the service failed (quote `request_id`), or cannot serve this call now."""


class ServiceUnavailable(ServerError):
    """503: device queue full, model weights missing, or the service is overloaded."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthenticationError,
    402: InsufficientCredits,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_class(status: int) -> type[ApiError]:
    """The exception class of an error answer's status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 400 <= status < 500:
        return InvalidRequest
    if status >= 500:
        return ServerError
    return InvalidResponse


def error_from_response(
    status: int, headers: Mapping[str, str], body: bytes, *, secret: str = ""
) -> ApiError:
    """The exception for an error answer, the key masked wherever an answer may echo it."""
    request_id = headers.get("x-request-id")
    retry_after = parse_retry_after(headers.get("retry-after"))
    cls = error_class(status)
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        text = body[:200].decode("utf-8", "replace").strip()
        message = text or "the service answered no error body"
        return cls(status, f"http_{status}", mask(message, secret), request_id, None, retry_after)
    details = {
        k: mask(v, secret) for k, v in error.items() if k not in ("code", "message", "request_id")
    }
    return cls(
        status,
        mask(str(error.get("code") or f"http_{status}"), secret),
        mask(str(error.get("message") or ""), secret),
        str(error["request_id"]) if error.get("request_id") else request_id,
        details,
        retry_after,
    )


def connection_error(base_url: str, exc: Exception, *, secret: str = "") -> ApiConnectionError:
    """The exception for a request that got no answer (never chained: the request it carries
    holds the key's header)."""
    kind = type(exc).__name__
    detail = mask(str(exc) or kind, secret)
    return ApiConnectionError(0, "connection_error", f"no answer from {base_url}: {kind}: {detail}")


def mask(value: Any, secret: str) -> Any:
    """`value` with `secret` replaced, when it is a string (other values as they are)."""
    if secret and isinstance(value, str):
        return value.replace(secret, "***")
    return value
