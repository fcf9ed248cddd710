"""What the synchronous and the asynchronous client share about sending: a call described as
data (`Call`: the request and how to read its answer), the retry decisions of one logical call
(`Attempts`), the httpx request of an attempt, and the file a download is written to.

Only the transport step differs between the two clients: `httpx.Client.send` and `time.sleep`
there, `await httpx.AsyncClient.send` and `await anyio.sleep` here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

import httpx

from imgsvc import __version__
from imgsvc.client.errors import IN_PROGRESS_CODE, ApiError, connection_error, error_from_response
from imgsvc.client.retry import RetryPolicy, parse_retry_after
from imgsvc.client.sources import FilePart, opened

T = TypeVar("T")
DOWNLOAD_CHUNK = 1 << 20
# Errors raised before a request's bytes left: safe to retry any request after them.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def new_idempotency_key() -> str:
    """A fresh random Idempotency-Key (well under the service's 255 characters)."""
    return "imgsvc-" + secrets.token_urlsafe(24)


@dataclass(frozen=True)
class RequestSpec:
    """One HTTP request, as data. `replayable`: sending it twice does nothing twice (a read,
    a quote, a cancel, or a POST carrying an Idempotency-Key), so it may be retried after an
    answer or a failure that leaves unknown whether the service did the work."""

    method: str
    path: str
    params: Sequence[tuple[str, str]] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, str] = field(default_factory=dict)
    files: Sequence[tuple[str, FilePart]] = ()
    json: object = None
    replayable: bool = True


@dataclass(frozen=True)
class Call(Generic[T]):
    """A request and the reader of its successful answer."""

    request: RequestSpec
    read: Callable[[httpx.Response], T]


@dataclass(frozen=True)
class ClientConfig:
    """A client's settings, checked once: where, who (the key, never shown), how to retry."""

    base_url: str
    headers: Mapping[str, str] = field(repr=False)
    policy: RetryPolicy
    secret: str = field(repr=False)


def client_config(
    base_url: str,
    api_key: str,
    *,
    max_attempts: int,
    max_retry_after: float,
    headers: Mapping[str, str] | None = None,
) -> ClientConfig:
    if not api_key or not all("!" <= c <= "~" for c in api_key):
        # Said without the key itself: an error message must never carry it.
        raise ValueError("the API key is empty or has characters a header cannot carry")
    if not base_url.lower().startswith(("http://", "https://")):
        raise ValueError(f"the service URL must start with http:// or https://: {base_url!r}")
    return ClientConfig(
        base_url=base_url.rstrip("/"),
        headers={
            **(headers or {}),
            "Authorization": f"Bearer {api_key}",
            "User-Agent": f"imgsvc-client/{__version__}",
        },
        policy=RetryPolicy(max_attempts=max_attempts, max_retry_after=max_retry_after),
        secret=api_key,
    )


@contextlib.contextmanager
def built(http: httpx.Client | httpx.AsyncClient, spec: RequestSpec) -> Iterator[httpx.Request]:
    """The httpx request of one attempt; its files are open while the block runs."""
    with opened(spec.files) as files:
        yield http.build_request(
            spec.method,
            spec.path,
            params=list(spec.params) or None,
            headers=dict(spec.headers),
            data=dict(spec.data) or None,
            files=files or None,
            json=spec.json,
        )


class Attempts:
    """The attempts of one logical call: whether (and after how long) to send it again."""

    def __init__(self, config: ClientConfig, spec: RequestSpec) -> None:
        self.config = config
        self.spec = spec
        self.count = 0

    def retry_answer(self, response: httpx.Response) -> float | None:
        """Seconds to wait before sending again after this (read) answer; None: it is final.

        429 is always retried (the service refuses it before any work); 503 and a 409 for an
        Idempotency-Key still running only when the request is replayable.
        """
        status = response.status_code
        if status < 400:
            return None
        again = status == 429 or (
            self.spec.replayable and (status == 503 or _in_progress(response))
        )
        if not again:
            return None
        return self._next(parse_retry_after(response.headers.get("retry-after")))

    def retry_error(self, exc: httpx.TransportError) -> float:
        """Seconds to wait before sending again after no answer; raises ApiConnectionError
        when no attempt is left (or the request may have reached the service and may not be
        repeated)."""
        delay = None
        if self.spec.replayable or isinstance(exc, _NOT_SENT):
            delay = self._next(None)
        if delay is None:
            raise connection_error(self.config.base_url, exc, secret=self.config.secret) from None
        return delay

    def result(self, call: Call[T], response: httpx.Response) -> T:
        """The call's result from its final (read) answer, or the error it is."""
        if response.status_code >= 400:
            raise self.error(response)
        return call.read(response)

    def error(self, response: httpx.Response) -> ApiError:
        return error_from_response(
            response.status_code, response.headers, response.content, secret=self.config.secret
        )

    def _next(self, retry_after: float | None) -> float | None:
        delay = self.config.policy.delay(self.count, retry_after)
        if delay is not None:
            self.count += 1
        return delay


def _in_progress(response: httpx.Response) -> bool:
    if response.status_code != 409:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("code") == IN_PROGRESS_CODE


class ResultFile:
    """A download written to a temporary file next to `dest`, renamed over it when complete
    (a failed or interrupted download leaves no partial file)."""

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=self.dest.parent, prefix=f".{self.dest.name}.", suffix=".tmp"
        )
        self._tmp = Path(tmp)
        self._out = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self._out.write(chunk)

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._out.close()
        if exc_type is None:
            os.replace(self._tmp, self.dest)
        else:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
