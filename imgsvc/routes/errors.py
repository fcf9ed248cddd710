"""Domain errors → HTTP: the status of each error class and the headers its facts become."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from imgsvc.billing.idempotency import IdempotencyInProgress, IdempotencyKeyReused
from imgsvc.billing.metering import MonthlyCapReached
from imgsvc.billing.ratelimit import RateLimited, RateState
from imgsvc.errors import (
    Busy,
    ConfigurationError,
    Conflict,
    Forbidden,
    InsufficientCredits,
    InvalidImage,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceError,
    Unauthorized,
    UnknownModel,
    UnsupportedMediaType,
)
from imgsvc.fetch import UrlFetchFailed, UrlNotAllowed
from imgsvc.jobs.files import StorageFull
from imgsvc.operations.execute import Cancelled

# The most specific class in an error's MRO decides.
STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 422,
    InvalidImage: 422,
    UnknownModel: 422,
    UrlNotAllowed: 422,
    UrlFetchFailed: 422,
    IdempotencyKeyReused: 422,
    UnsupportedMediaType: 415,
    PayloadTooLarge: 413,
    RequestTimeout: 408,
    Unauthorized: 401,
    InsufficientCredits: 402,
    MonthlyCapReached: 402,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    IdempotencyInProgress: 409,
    RateLimited: 429,
    ModelUnavailable: 503,
    Busy: 503,
    ConfigurationError: 500,
    Cancelled: 499,  # the client closed the connection (nobody reads the answer)
    StorageFull: 507,  # the job folder is full
}


def error_status(exc: ServiceError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def rate_headers(state: RateState) -> dict[str, str]:
    """The IETF RateLimit draft's headers for where a key stands."""
    return {
        "RateLimit-Policy": f'"default";q={state.limit};w={state.window_seconds}',
        "RateLimit": f'"default";r={state.remaining};t={state.reset_seconds}',
    }


def error_headers(exc: ServiceError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, RateLimited):
        headers |= rate_headers(exc.state)
    for field, header in (
        ("credits_required", "X-Credits-Required"),
        ("credits_remaining", "X-Credits-Remaining"),
    ):
        if field in exc.extra:
            headers[header] = str(exc.extra[field])
    return headers


def validation_message(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one line: `field: what is wrong; …`."""
    parts = []
    for err in errors:
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


REMOVEBG_PREFIX = "/v1.0/"  # remove.bg's routes answer errors in remove.bg's body


def error_body(code: str, message: str, request_id: str, **extra: object) -> dict[str, object]:
    """The JSON error every failure answers with: `{"error": {code, message, request_id}}`."""
    return {"error": {"code": code, "message": message, "request_id": request_id, **extra}}


def error_body_for(path: str, code: str, message: str, request_id: str) -> dict[str, object]:
    """`error_body`, or remove.bg's `{"errors": [{title, code, request_id}]}` on its routes."""
    if path.startswith(REMOVEBG_PREFIX):
        return {"errors": [{"title": message, "code": code, "request_id": request_id}]}
    return error_body(code, message, request_id)
