"""A typed client of the batch jobs API (`/v1/jobs`), on httpx.

`Client` is synchronous. What does not depend on the transport (the retry policy, the form of a
job submission, error parsing) sits in plain functions and classes here, so an asynchronous
client only has to repeat the small send loops with `httpx.AsyncClient` and `asyncio.sleep`.

Retries: 429 and 503 answers and connection errors are retried, honouring `Retry-After` (capped,
with jitter), but only where a retry cannot do anything twice: every GET, a cancel, a quote
(`dry_run`), and a job submission, which always carries an `Idempotency-Key` (one is made per
call when the caller gives none), so that the service replays the same job instead of charging
again. The API key is sent in a header and never appears in an exception or a log line.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import mimetypes
import os
import random
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import httpx

from imgsvc import __version__

FINISHED_STATUSES = frozenset({"succeeded", "partially_failed", "failed", "canceled"})
RETRY_STATUSES = frozenset({429, 503})
# Answered while the first request with the same Idempotency-Key still runs: retry it later.
IN_PROGRESS_CODE = "idempotency_in_progress"
DOWNLOAD_CHUNK = 1 << 20

_T = TypeVar("_T")


class ApiError(Exception):
    """An error answer of the service (or no answer at all: `status` 0)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(status, code, message, request_id)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.details: dict[str, Any] = details or {}

    def __str__(self) -> str:
        where = f" (request id {self.request_id})" if self.request_id else ""
        status = f"HTTP {self.status} " if self.status else ""
        return f"{status}{self.code}: {self.message}{where}"


class _Retryable(Exception):
    """One attempt's answer that may be retried: the error, and the service's Retry-After."""

    def __init__(self, error: ApiError, retry_after: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def is_finished(job: Mapping[str, Any]) -> bool:
    """Whether a job object has reached a final status."""
    return job.get("status") in FINISHED_STATUSES


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds (a number or an HTTP date); None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before retry number `attempt` (0-based)."""

    retries: int = 4
    max_retry_after_s: float = 60.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None when no retry is left."""
        if attempt >= self.retries:
            return None
        if retry_after is not None:
            # Never earlier than the service asked (unless over the cap), a little later at random
            # so that many clients told the same thing do not come back at the same instant.
            wait = min(retry_after, self.max_retry_after_s)
            return wait + random.uniform(0.0, 0.1 * wait + 0.05)
        backoff = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return random.uniform(backoff / 2, backoff)


def error_from_response(status: int, headers: httpx.Headers, body: bytes) -> ApiError:
    """The ApiError for an error answer: `{"error": {"code", "message", "request_id", ...}}`."""
    request_id = headers.get("x-request-id")
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        text = body[:200].decode("utf-8", "replace").strip()
        return ApiError(
            status, f"http_{status}", text or "the service answered no error body", request_id
        )
    details = {k: v for k, v in error.items() if k not in ("code", "message", "request_id")}
    return ApiError(
        status,
        str(error.get("code") or f"http_{status}"),
        str(error.get("message") or ""),
        str(error["request_id"]) if error.get("request_id") else request_id,
        details,
    )


def connection_error(base_url: str, exc: httpx.TransportError) -> ApiError:
    """An ApiError (status 0) for a request that got no answer."""
    kind = type(exc).__name__
    detail = str(exc) or kind
    return ApiError(0, "connection_error", f"no answer from {base_url}: {kind}: {detail}")


def new_idempotency_key() -> str:
    """A fresh random Idempotency-Key (well under the service's 255 characters)."""
    return "imgsvc-" + secrets.token_urlsafe(24)


def job_form(
    operation: str,
    options: Mapping[str, str] | None,
    webhook_url: str | None,
) -> dict[str, str]:
    """The form fields of a job submission other than its files."""
    fields = {"operation": operation}
    for name, value in (options or {}).items():
        if name in ("operation", "files", "file", "webhook_url"):
            raise ValueError(f"{name!r} is not an option of an operation")
        fields[name] = str(value)
    if webhook_url is not None:
        fields["webhook_url"] = webhook_url
    return fields


class Client:
    """Synchronous client of the batch jobs API."""

    def __init__(
        self,
        api_url: str,
        key: str,
        *,
        timeout: float = 120.0,
        retries: int = 4,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not key or not all("!" <= c <= "~" for c in key):
            # Said without the key itself: an error message must never carry it.
            raise ValueError("the API key is empty or has characters a header cannot carry")
        self._key = key
        self.api_url = api_url.rstrip("/")
        self.policy = RetryPolicy(retries=retries)
        self._http = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {key}", "User-Agent": f"imgsvc/{__version__}"},
            timeout=timeout,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"Client({self.api_url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- jobs --------------------------------------------------------------------------------

    def submit_job(
        self,
        operation: str,
        files: Sequence[tuple[str, Path | bytes]],
        *,
        options: Mapping[str, str] | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """POST /v1/jobs: the job (202), or with `dry_run` the quote (nothing is created)."""
        if not files:
            raise ValueError("a job needs at least one file")
        data = job_form(operation, options, webhook_url)
        headers: dict[str, str] = {}
        params: dict[str, str] = {}
        if dry_run:
            params["dry_run"] = "true"  # creates nothing: safe to retry without a key
        else:
            headers["Idempotency-Key"] = idempotency_key or new_idempotency_key()

        def once() -> httpx.Response:
            with _opened(files) as parts:
                response = self._http.post(
                    "/v1/jobs", data=data, files=parts, headers=headers, params=params
                )
            return _checked(response)

        return _json_object(self._call(once))

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}."""
        return self._get_json(f"/v1/jobs/{_segment(job_id)}")

    def jobs(self, *, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """GET /v1/jobs: the key's jobs, one page."""
        body = self._get_json("/v1/jobs", params={"limit": str(limit), "offset": str(offset)})
        jobs = body.get("jobs")
        if not isinstance(jobs, list):
            raise ApiError(200, "invalid_response", "the job list has no 'jobs' array")
        return [j for j in jobs if isinstance(j, dict)]

    def wait(
        self,
        job_id: str,
        *,
        poll_s: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it is finished; `on_progress` sees every job object read."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if is_finished(job):
                return job
            if deadline is not None and time.monotonic() + poll_s > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout_s} s")
            _sleep(poll_s)

    def download_result(self, job_id: str, dest: Path) -> Path:
        """GET /v1/jobs/{id}/result, streamed to a temporary file renamed to `dest`."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = f"/v1/jobs/{_segment(job_id)}/result"

        def once() -> Path:
            with self._http.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    _checked(response)
                fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                            out.write(chunk)
                    os.replace(tmp, dest)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
            return dest

        return self._call(once)

    def item_output(self, job_id: str, item: int) -> bytes:
        """GET /v1/jobs/{id}/items/{n}: one item's output bytes."""
        path = f"/v1/jobs/{_segment(job_id)}/items/{int(item)}"
        return self._call(lambda: _checked(self._http.get(path))).content

    def cancel(self, job_id: str) -> dict[str, Any]:
        """DELETE /v1/jobs/{id}: cancel what has not run yet; the job object."""
        path = f"/v1/jobs/{_segment(job_id)}"
        return _json_object(self._call(lambda: _checked(self._http.delete(path))))

    # -- sending -----------------------------------------------------------------------------

    def _get_json(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = self._call(lambda: _checked(self._http.get(path, params=params)))
        return _json_object(response)

    def _call(self, once: Callable[[], _T]) -> _T:
        """Run one attempt, then retries while the policy allows them."""
        attempt = 0
        while True:
            try:
                return once()
            except _Retryable as exc:
                delay = self.policy.delay(attempt, exc.retry_after)
                if delay is None:
                    raise self._masked(exc.error) from None
            except ApiError as exc:
                raise self._masked(exc) from None
            except httpx.TransportError as exc:
                delay = self.policy.delay(attempt, None)
                if delay is None:
                    # Not chained: the request it carries holds the key's header.
                    raise self._masked(connection_error(self.api_url, exc)) from None
            attempt += 1
            _sleep(delay)

    def _masked(self, error: ApiError) -> ApiError:
        """The error with the key masked wherever an answer or a library may have echoed it."""
        secret = self._key

        def mask(value: Any) -> Any:
            return value.replace(secret, "***") if isinstance(value, str) else value

        return ApiError(
            error.status,
            mask(error.code),
            mask(error.message),
            mask(error.request_id),
            {k: mask(v) for k, v in error.details.items()},
        )


def _sleep(seconds: float) -> None:
    """Waiting between attempts and polls (one place, so tests can watch it)."""
    time.sleep(seconds)


def _segment(value: str) -> str:
    """A job id as one path segment."""
    if not value or "/" in value or value in (".", ".."):
        raise ValueError(f"not a job id: {value!r}")
    return value


@contextlib.contextmanager
def _opened(
    files: Sequence[tuple[str, Path | bytes]],
) -> Iterator[list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]]:
    """The repeated `files` parts, each file opened afresh for this attempt."""
    with contextlib.ExitStack() as stack:
        parts: list[tuple[str, tuple[str, IO[bytes] | bytes, str]]] = []
        for name, content in files:
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            body: IO[bytes] | bytes
            body = (
                content if isinstance(content, bytes) else stack.enter_context(content.open("rb"))
            )
            parts.append(("files", (name, body, kind)))
        yield parts


def _checked(response: httpx.Response) -> httpx.Response:
    """The response if it succeeded; raises ApiError, or _Retryable when a retry may help.

    Every call of this client is safe to repeat (see the module docstring), so each may retry.
    """
    if response.status_code < 400:
        return response
    error = error_from_response(response.status_code, response.headers, response.content)
    if response.status_code in RETRY_STATUSES or error.code == IN_PROGRESS_CODE:
        raise _Retryable(error, parse_retry_after(response.headers.get("retry-after")))
    raise error


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(
            response.status_code,
            "invalid_response",
            f"expected a JSON object, got {response.headers.get('content-type', 'no body type')}",
            response.headers.get("x-request-id"),
        )
    return body
