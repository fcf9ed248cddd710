"""`Client`: the synchronous client (httpx.Client). Each method builds its call in
`imgsvc.client.calls` and sends it with `_run`; `AsyncClient` is the same with `await`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar, Unpack

import httpx

from imgsvc.client import calls
from imgsvc.client.calls import GroupBy, JobQuoteInputs, JobSubmission, QuoteOptions, UsageFilters
from imgsvc.client.options import (
    EraseOptions,
    InpaintOptions,
    Operation,
    RemoveBackgroundOptions,
    UpscaleOptions,
)
from imgsvc.client.polling import JobWatch
from imgsvc.client.results import (
    Account,
    CreatedKey,
    ImageResult,
    Job,
    JobQuote,
    ModelInfo,
    Quote,
    UsagePage,
    UsageSummary,
)
from imgsvc.client.sending import (
    DOWNLOAD_CHUNK,
    Attempts,
    Call,
    RequestSpec,
    ResultFile,
    built,
    client_config,
)
from imgsvc.client.sources import ImageSource, JobFile

T = TypeVar("T")


class Client:
    """The imgsvc API, synchronously. Use it as a context manager (or call `close()`).

    `max_attempts` counts the first attempt; retries honour `Retry-After` up to
    `max_retry_after` seconds. `transport` and `sleep` are for tests and special set-ups.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 120.0,
        max_attempts: int = 5,
        max_retry_after: float = 60.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._config = client_config(
            base_url,
            api_key,
            max_attempts=max_attempts,
            max_retry_after=max_retry_after,
            headers=headers,
        )
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self._config.base_url,
            headers=dict(self._config.headers),
            timeout=timeout,
            transport=transport,
        )

    @property
    def base_url(self) -> str:
        return self._config.base_url

    def __repr__(self) -> str:
        return f"Client({self._config.base_url!r})"

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

    # -- operations ----------------------------------------------------------------------------

    def remove_background(
        self,
        image: ImageSource,
        *,
        bg_image: ImageSource | None = None,
        idempotency_key: str | None = None,
        client_ref: str | None = None,
        **options: Unpack[RemoveBackgroundOptions],
    ) -> ImageResult:
        """POST /v1/remove-background: `image` (and `bg_image`) as bytes, a path or a URL."""
        return self._run(
            calls.remove_background(
                image,
                bg_image=bg_image,
                idempotency_key=idempotency_key,
                client_ref=client_ref,
                **options,
            )
        )

    def upscale(
        self,
        image: ImageSource,
        *,
        idempotency_key: str | None = None,
        client_ref: str | None = None,
        **options: Unpack[UpscaleOptions],
    ) -> ImageResult:
        """POST /v1/upscale: `image` as bytes or a path."""
        return self._run(
            calls.upscale(image, idempotency_key=idempotency_key, client_ref=client_ref, **options)
        )

    def inpaint(
        self,
        image: ImageSource,
        mask: ImageSource | None = None,
        *,
        prompt: str | None = None,
        idempotency_key: str | None = None,
        client_ref: str | None = None,
        **options: Unpack[InpaintOptions],
    ) -> ImageResult:
        """POST /v1/inpaint: repaint the mask's white area from `prompt` (erase without one)."""
        return self._run(
            calls.inpaint(
                image,
                mask,
                prompt=prompt,
                idempotency_key=idempotency_key,
                client_ref=client_ref,
                **options,
            )
        )

    def erase(
        self,
        image: ImageSource,
        mask: ImageSource | None = None,
        *,
        idempotency_key: str | None = None,
        client_ref: str | None = None,
        **options: Unpack[EraseOptions],
    ) -> ImageResult:
        """POST /v1/inpaint without a prompt: remove what the mask covers."""
        return self._run(
            calls.erase(
                image, mask, idempotency_key=idempotency_key, client_ref=client_ref, **options
            )
        )

    def quote(
        self, operation: Operation, width: int, height: int, **sizes: Unpack[QuoteOptions]
    ) -> Quote:
        """POST /v1/quote: a call's price from the input size; nothing is charged."""
        return self._run(calls.quote(operation, width, height, **sizes))

    # -- jobs ----------------------------------------------------------------------------------

    def submit_job(
        self,
        operation: Operation,
        files: Sequence[JobFile] = (),
        **submission: Unpack[JobSubmission],
    ) -> Job:
        """POST /v1/jobs with `files`, one `zip_file` or `urls`: the job (queued)."""
        return self._run(calls.submit_job(operation, files, **submission))

    def quote_job(
        self,
        operation: Operation,
        files: Sequence[JobFile] = (),
        **inputs: Unpack[JobQuoteInputs],
    ) -> JobQuote:
        """POST /v1/jobs?dry_run=true: the job's price; nothing is created or held."""
        return self._run(calls.quote_job(operation, files, **inputs))

    def job(self, job_id: str) -> Job:
        """GET /v1/jobs/{id}."""
        return self._run(calls.get_job(job_id))

    def jobs(self, *, limit: int = 20, offset: int = 0) -> list[Job]:
        """GET /v1/jobs: the key's jobs, newest first (without their items)."""
        return self._run(calls.list_jobs(limit, offset))

    def wait(
        self,
        job_id: str,
        *,
        progress: Callable[[Job], object] | None = None,
        timeout: float | None = None,
        poll_interval: float = 1.0,
    ) -> Job:
        """Read the job until it has finished; `progress` sees every reading. Raises
        JobWaitTimeout after `timeout` seconds (the job goes on)."""
        watch = JobWatch(poll_interval, timeout)
        while True:
            job, retry_after = self._run(calls.poll_job(job_id))
            if progress is not None:
                progress(job)
            delay = watch.next_delay(job, retry_after)
            if delay is None:
                return job
            self._sleep(delay)

    def download_result(self, job_id: str, dest: str | os.PathLike[str]) -> Path:
        """GET /v1/jobs/{id}/result, streamed into the zip file `dest`; its path."""
        return self._download(calls.job_result(job_id), Path(dest))

    def item_output(self, job_id: str, item: int) -> bytes:
        """GET /v1/jobs/{id}/items/{n}: one item's output."""
        return self._run(calls.job_item(job_id, item))

    def cancel(self, job_id: str) -> Job:
        """DELETE /v1/jobs/{id}: items not started are canceled and not charged."""
        return self._run(calls.cancel_job(job_id))

    def webhook_secret(self) -> str:
        """POST /v1/webhooks/secret: a new signing secret for this key's webhooks."""
        return self._run(calls.webhook_secret())

    # -- account -------------------------------------------------------------------------------

    def account(self) -> Account:
        """GET /v1/account: the key, its account's live balance and its limits."""
        return self._run(calls.account())

    def usage(
        self, *, limit: int = 100, offset: int = 0, **filters: Unpack[UsageFilters]
    ) -> UsagePage:
        """GET /v1/usage: one row per charged call, newest first."""
        return self._run(calls.usage(limit, offset, **filters))

    def usage_csv(
        self, *, limit: int = 100_000, offset: int = 0, **filters: Unpack[UsageFilters]
    ) -> str:
        """GET /v1/usage as CSV."""
        return self._run(calls.usage_csv(limit, offset, **filters))

    def usage_summary(
        self, *, group_by: GroupBy = "day", **filters: Unpack[UsageFilters]
    ) -> UsageSummary:
        """GET /v1/usage/summary: calls and credits per day, operation, client_ref or key."""
        return self._run(calls.usage_summary(group_by, **filters))

    def statement(self, month: str) -> UsageSummary:
        """GET /v1/statements/{YYYY-MM}: the month by operation."""
        return self._run(calls.statement(month))

    def statement_csv(self, month: str) -> str:
        """GET /v1/statements/{YYYY-MM} as CSV: every charged call of the month."""
        return self._run(calls.statement_csv(month))

    def create_sub_key(
        self, name: str, *, monthly_cap: int | None = None, scopes: Sequence[str] | None = None
    ) -> CreatedKey:
        """POST /v1/keys (a `keys:children` key): a sub-key; its secret is shown only now."""
        return self._run(calls.create_sub_key(name, monthly_cap=monthly_cap, scopes=scopes))

    def sub_keys(self) -> list[Account]:
        """GET /v1/keys: the active sub-keys with what each spent this month."""
        return self._run(calls.sub_keys())

    def revoke_sub_key(self, key_id: int) -> Account:
        """DELETE /v1/keys/{id}: revoke a sub-key at once."""
        return self._run(calls.revoke_sub_key(key_id))

    def sub_key_usage(self, key_id: int, *, limit: int = 100, offset: int = 0) -> UsagePage:
        """GET /v1/keys/{id}/usage: one sub-key's calls."""
        return self._run(calls.sub_key_usage(key_id, limit, offset))

    def models(self) -> list[ModelInfo]:
        """GET /v1/models: every operation's models, and whether their weights are present."""
        return self._run(calls.models())

    # -- sending -------------------------------------------------------------------------------

    def _run(self, call: Call[T]) -> T:
        """Send the call, and again while its attempts allow; its result or its error."""
        attempts = Attempts(self._config, call.request)
        delay: float | None
        while True:
            try:
                with built(self._http, call.request) as request:
                    response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = attempts.retry_error(exc)
            else:
                delay = attempts.retry_answer(response)
                if delay is None:
                    return attempts.result(call, response)
            self._sleep(delay)

    def _download(self, spec: RequestSpec, dest: Path) -> Path:
        """Stream a GET's body into `dest` (written whole or not at all), with retries."""
        attempts = Attempts(self._config, spec)
        delay: float | None
        while True:
            try:
                with built(self._http, spec) as request:
                    response = self._http.send(request, stream=True)
                try:
                    if response.status_code < 400:
                        with ResultFile(dest) as out:
                            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                                out.write(chunk)
                        return dest
                    response.read()
                finally:
                    response.close()
            except httpx.TransportError as exc:
                delay = attempts.retry_error(exc)
            else:
                delay = attempts.retry_answer(response)
                if delay is None:
                    raise attempts.error(response)
            self._sleep(delay)
