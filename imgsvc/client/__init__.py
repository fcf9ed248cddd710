"""A typed Python client of the imgsvc API, synchronous (`Client`) and asynchronous
(`AsyncClient`), on httpx. See docs/client.md.

    from imgsvc.client import Client

    with Client("http://127.0.0.1:8000", "isk_…") as imgsvc:
        cutout = imgsvc.remove_background("shoe.jpg", bg_color="white", format="jpg")
        cutout.save("shoe-white.jpg")
        print(cutout.credits_charged, cutout.credits_remaining, cutout.request_id)

Calls are retried on 429 and 503 answers and on connection errors, after the service's
`Retry-After` (capped) or an exponential backoff, at most `max_attempts` times in all, and only
where a retry cannot do anything twice: every operation and job submission carries one
Idempotency-Key for all its attempts, so a retry is replayed by the service, never charged
again. Errors are `ApiError` subclasses carrying `status`, `code`, `message` and
`request_id`. The API key is sent in a header only: it is in no repr, exception or log line.
"""

from imgsvc.client.async_client import AsyncClient
from imgsvc.client.calls import GroupBy, JobQuoteInputs, JobSubmission, QuoteOptions, UsageFilters
from imgsvc.client.errors import (
    ApiConnectionError,
    ApiError,
    AuthenticationError,
    Conflict,
    InsufficientCredits,
    InvalidRequest,
    InvalidResponse,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from imgsvc.client.options import (
    EraseOptions,
    InpaintOptions,
    Operation,
    OptionValue,
    RemoveBackgroundOptions,
    UpscaleOptions,
)
from imgsvc.client.polling import JobWaitTimeout
from imgsvc.client.results import (
    Account,
    CreatedKey,
    ImageResult,
    ItemError,
    ItemFailure,
    Job,
    JobItem,
    JobProgress,
    JobQuote,
    ModelInfo,
    Quote,
    UsageGroup,
    UsagePage,
    UsageRecord,
    UsageSummary,
)
from imgsvc.client.retry import RetryPolicy, parse_retry_after
from imgsvc.client.sending import new_idempotency_key
from imgsvc.client.sources import ImageSource, JobFile
from imgsvc.client.sync_client import Client

__all__ = [
    "Account",
    "ApiConnectionError",
    "ApiError",
    "AsyncClient",
    "AuthenticationError",
    "Client",
    "Conflict",
    "CreatedKey",
    "EraseOptions",
    "GroupBy",
    "ImageResult",
    "ImageSource",
    "InpaintOptions",
    "InsufficientCredits",
    "InvalidRequest",
    "InvalidResponse",
    "ItemError",
    "ItemFailure",
    "Job",
    "JobFile",
    "JobItem",
    "JobProgress",
    "JobQuote",
    "JobQuoteInputs",
    "JobSubmission",
    "JobWaitTimeout",
    "ModelInfo",
    "NotFound",
    "Operation",
    "OptionValue",
    "PayloadTooLarge",
    "PermissionDenied",
    "Quote",
    "QuoteOptions",
    "RateLimited",
    "RemoveBackgroundOptions",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "UnsupportedMediaType",
    "UpscaleOptions",
    "UsageFilters",
    "UsageGroup",
    "UsagePage",
    "UsageRecord",
    "UsageSummary",
    "new_idempotency_key",
    "parse_retry_after",
]
