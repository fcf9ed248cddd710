"""Domain errors with a stable machine-readable code and an HTTP status.

Engines and billing raise these; `app.py` turns them into the JSON error body of DESIGN.md.
Messages say what to fix and never contain secrets or internal tracebacks.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `code` is snake_case and stable, `status` the HTTP status to answer with."""

    code = "internal_error"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the JSON error object


class InvalidInput(ServiceError):
    code = "invalid_input"
    status = 422


class InvalidImage(ServiceError):
    code = "invalid_image"
    status = 422


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"
    status = 415


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"
    status = 413


class ModelUnavailable(ServiceError):
    """The requested model's weights are not installed; the message names the file(s) to add."""

    code = "model_unavailable"
    status = 503


class UnknownModel(ServiceError):
    code = "unknown_model"
    status = 422


class Unauthorized(ServiceError):
    code = "unauthorized"
    status = 401


class Forbidden(ServiceError):
    code = "forbidden"
    status = 403


class Conflict(ServiceError):
    code = "conflict"
    status = 409


class RateLimited(ServiceError):
    code = "rate_limited"
    status = 429


class InsufficientCredits(ServiceError):
    code = "insufficient_credits"
    status = 402


class NotFound(ServiceError):
    code = "not_found"
    status = 404
