"""The metered call, shared by every operation route, after the gate has admitted the caller:

prepare (decode, validate, price; off the event loop) → `?dry_run=true`: the quote →
Idempotency-Key → `operations.execute` in a worker thread (admission, hold, run, capture) →
the response, stored for idempotent replays before the thread lets go of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from imgsvc.billing.charge import RequestIdTaken
from imgsvc.billing.idempotency import Claim, Claims, Completion, StoredResponse
from imgsvc.billing.keys import KeyInfo
from imgsvc.errors import PayloadTooLarge
from imgsvc.images import MEDIA_TYPES
from imgsvc.operations.context import Context
from imgsvc.operations.execute import Cancelled, Charged, execute
from imgsvc.operations.prepared import Prepared, Result
from imgsvc.routes.deps import new_request_id

log = logging.getLogger("imgsvc")
DISCONNECT_POLL_S = 0.25  # how often a running call checks that its client is still there
# OpenAPI description of an image response, shared by the operation routes.
IMAGE_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "content": {mt: {} for mt in MEDIA_TYPES.values()},
        "description": "The result image. Headers: X-Request-Id, X-Credits-Charged, "
        "X-Credits-Remaining, X-Model, RateLimit, RateLimit-Policy. Send `Idempotency-Key` "
        "to make retries safe and `X-Client-Ref` to tag the usage row.",
    }
}
# A result rendered as an HTTP body: (body, media type); the default is the result itself.
Render = Callable[[Result], tuple[bytes, str]]


@dataclass(frozen=True)
class Respond:
    """How a route answers a charged result: extra headers, and another body if it wants."""

    headers: dict[str, str] | None = None
    render: Render | None = None


async def read_upload(upload: UploadFile, max_bytes: int, what: str) -> bytes:
    """Read an uploaded file, refusing oversize ones before reading them into memory."""
    if upload.size is not None and upload.size > max_bytes:
        raise PayloadTooLarge(f"{what} is {upload.size} bytes; the limit is {max_bytes}")
    return await upload.read()


async def dry_run_param(
    request: Request,
    dry_run: Annotated[
        bool, Query(description="quote only: return the price and output size, charge nothing")
    ] = False,
) -> None:
    """Router-level dependency of every metered operation (documents `?dry_run=true`)."""
    request.state.dry_run = dry_run


async def request_fingerprint(request: Request) -> str:
    """What makes two requests "the same" for Idempotency-Key: method, path, query and every
    form field (files by content), independent of the multipart boundary or field order."""
    digest = hashlib.sha256(f"{request.method} {request.url.path}\n".encode())
    for k, v in sorted(request.query_params.multi_items()):
        digest.update(f"q:{k}={v}\n".encode())
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        for name, value in sorted(form.multi_items(), key=lambda kv: kv[0]):
            if isinstance(value, str):
                digest.update(f"f:{name}={value}\n".encode())
            else:
                await value.seek(0)
                content = hashlib.sha256(await value.read()).hexdigest()
                digest.update(f"f:{name}=<file {content}>\n".encode())
    else:
        digest.update(await request.body())
    return digest.hexdigest()


async def metered_call(
    request: Request,
    key: KeyInfo,
    prepare: Callable[[Context], Prepared],
    respond: Respond | None = None,
) -> Response:
    """Prepare the call, then quote it (dry run) or run it charged and answer its result."""
    prepared = await run_in_threadpool(prepare, request.app.state.context)
    if getattr(request.state, "dry_run", False):
        return _quote(prepared)
    idem_key = request.headers.get("idempotency-key")
    claim = None
    if idem_key is not None:
        claimed = await _claim(request, key, idem_key)
        if isinstance(claimed, StoredResponse):
            headers = {**claimed.headers, "Idempotent-Replayed": "true"}
            return Response(claimed.body, claimed.status, headers, claimed.media_type)
        claim = claimed
    done = await ChargedCall(request, key, prepared, respond or Respond(), claim).run()
    return Response(done.body, done.status, done.headers, done.media_type)


async def _claim(request: Request, key: KeyInfo, idem_key: str) -> Claim | StoredResponse:
    """Claim the Idempotency-Key for this request, or the stored response to replay."""
    claims: Claims = request.app.state.claims
    fingerprint = await request_fingerprint(request)
    return await run_in_threadpool(
        lambda: claims.begin(key_id=key.id, idem_key=idem_key, fingerprint=fingerprint)
    )


class ChargedCall:
    """`operations.execute` in a worker thread that owns the outcome once it has started: if
    the caller goes away, the hold is released (Cancelled); once charged, the response is
    stored for idempotent replays (in the capture's transaction), whoever is still waiting."""

    def __init__(
        self,
        request: Request,
        key: KeyInfo,
        prepared: Prepared,
        respond: Respond,
        claim: Claim | None,
    ) -> None:
        self._request = request
        self._state = request.app.state
        self._request_state = request.state
        self._key, self._prepared, self._respond, self._idem = key, prepared, respond, claim
        self._cancelled, self._started, self._claim = (
            threading.Event(),
            threading.Event(),
            threading.Lock(),
        )
        self._stored: StoredResponse | None = None

    async def run(self) -> StoredResponse:
        watcher = asyncio.create_task(self._watch())
        try:
            done = await anyio.to_thread.run_sync(
                self._in_thread, abandon_on_cancel=True, limiter=self._state.call_threads
            )
        except BaseException:
            with self._claim:
                self._cancelled.set()  # a no-op once the thread has captured
            if not self._started.is_set():  # the thread will never run: clean up here
                with anyio.CancelScope(shield=True):
                    await run_in_threadpool(self._abort)
            raise
        finally:
            watcher.cancel()
        return done

    async def _watch(self) -> None:
        """A client that hangs up is not charged: the thread releases instead of capturing."""
        while not await self._request.is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        with self._claim:
            self._cancelled.set()

    def _execute(self) -> Charged:
        return execute(
            self._prepared,
            meter=self._state.meter,
            admission=self._state.context.registry.admission,
            key=self._key,
            request_id=self._request_state.request_id,
            client_ref=self._request_state.client_ref,
            cancelled=self._cancelled,
            completion=None if self._idem is None else self._completion,
        )

    def _completion(self, result: Result) -> Completion:
        """The response to store with the charge: rendered now, outside its transaction,
        but for the credit headers, which the capture fills in."""
        assert self._idem is not None
        body, media_type = _body(result, self._respond)
        rate = getattr(self._request_state, "extra_headers", {})

        def render(charged: int, remaining: int) -> StoredResponse:
            outcome = Charged(result, charged, remaining)
            self._stored = StoredResponse(
                200, _headers(outcome, self._respond, rate), body, media_type
            )
            return self._stored

        return Completion(self._idem, render)

    def _in_thread(self) -> StoredResponse:
        with self._claim:
            if self._cancelled.is_set():
                raise Cancelled("the caller went away")
            self._started.set()
        state, request_state = self._state, self._request_state
        try:
            try:
                outcome = self._execute()
            except RequestIdTaken:
                if not getattr(request_state, "request_id_from_caller", False):
                    raise
                # The caller's own X-Request-Id is in the ledger already (theirs or another
                # account's): this call gets an id of the service's, sent back as usual.
                request_state.request_id = new_request_id()
                outcome = self._execute()
        except BaseException:
            self._abort()
            raise
        if self._idem is not None:
            state.claims.done(self._idem)
        if self._stored is not None:
            return self._stored
        return _response(outcome, self._respond, getattr(request_state, "extra_headers", {}))

    def _abort(self) -> None:
        if self._idem is not None:
            self._state.claims.abort(self._idem)


def _quote(prepared: Prepared) -> Response:
    quote = prepared.priced
    body = {
        "operation": quote.operation,
        "credits": quote.credits,
        "output_width": quote.output_size[0],
        "output_height": quote.output_size[1],
        "price_version": quote.price_version,
    }
    return JSONResponse(body, headers={"X-Credits-Would-Charge": str(quote.credits)})


def _response(outcome: Charged, respond: Respond, rate: dict[str, str]) -> StoredResponse:
    body, media_type = _body(outcome.result, respond)
    return StoredResponse(200, _headers(outcome, respond, rate), body, media_type)


def _body(result: Result, respond: Respond) -> tuple[bytes, str]:
    return (
        respond.render(result) if respond.render is not None else (result.body, result.media_type)
    )


def _headers(outcome: Charged, respond: Respond, rate: dict[str, str]) -> dict[str, str]:
    result = outcome.result
    return {
        "X-Credits-Charged": str(outcome.charged),
        "X-Credits-Remaining": str(outcome.remaining),
        "X-Model": result.model,
        "X-Width": str(result.output_size[0]),
        "X-Height": str(result.output_size[1]),
        **result_headers(result, respond.headers or {}),
        **rate,
    }


def result_headers(result: Result, extra: dict[str, str]) -> dict[str, str]:
    """The facts of a result as response headers (a route's own `extra` ones in between)."""
    headers: dict[str, str] = {}
    if result.model_version is not None:
        headers["X-Model-Version"] = result.model_version
    headers |= extra
    if result.seed is not None:
        headers["X-Seed"] = str(result.seed)
    if result.subject_box is not None:
        x0, y0, x1, y1 = result.subject_box
        headers |= {
            "X-Foreground-Top": str(y0),
            "X-Foreground-Left": str(x0),
            "X-Foreground-Width": str(x1 - x0),
            "X-Foreground-Height": str(y1 - y0),
        }
    if result.warning:
        headers["X-Warning"] = result.warning
    if result.compliance is not None:
        reasons = ",".join(result.compliance)
        headers["X-Compliance"] = f"fail; reasons={reasons}" if reasons else "pass"
    return headers
