"""Domain errors with a stable machine-readable code; no HTTP here.

Engines, operations and billing raise these; `imgsvc/routes/errors.py` maps each class to its
HTTP status and headers and `app.py` writes the JSON error body
`{"error": {"code", "message", "request_id"}}`. Messages say what to fix and never contain
secrets or internal tracebacks.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: `code` is snake_case and stable.

    `retry_after_s`: when the same call may succeed again (queue full, rate limit, in progress);
    `extra`: more fields of the JSON error object (e.g. credits_required).
    """

    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: int | None = None,
        extra: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.extra = extra or {}


class InvalidInput(ServiceError):
    """An option or input the operation cannot work with (what to change is in the message)."""

    code = "invalid_input"


class InvalidImage(ServiceError):
    code = "invalid_image"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class RequestTimeout(ServiceError):
    """The request's body stopped arriving before it was complete."""

    code = "request_timeout"


class ModelUnavailable(ServiceError):
    """The requested model's weights are not installed; the message names the file(s) to add."""

    code = "model_unavailable"


class UnknownModel(ServiceError):
    code = "unknown_model"


class Unauthorized(ServiceError):
    code = "unauthorized"


class Forbidden(ServiceError):
    code = "forbidden"


class Conflict(ServiceError):
    code = "conflict"


class InsufficientCredits(ServiceError):
    code = "insufficient_credits"


class NotFound(ServiceError):
    code = "not_found"


class Busy(ServiceError):
    """Too many calls are waiting for the device; retry after `retry_after_s`."""

    code = "queue_full"


class ConfigurationError(ServiceError):
    """The service's own configuration is unusable (an operator error, not the caller's)."""

    code = "configuration_error"
