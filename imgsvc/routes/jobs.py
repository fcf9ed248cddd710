"""Batch jobs: POST /v1/jobs (files, one zip, or URLs) → 202; status, result zip, one item's
output, cancel, list. Also `respond_async`: any operation route with `Prefer: respond-async`
answers 202 with a one-item job.

A job is priced item by item at submission (each image decoded and validated, nothing run) and
every valid item's credits are held in the transaction that stores the job, so a job cannot
overdraw; an item that fails is released, never charged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import Message

from imgsvc import images
from imgsvc.billing import idempotency
from imgsvc.billing.idempotency import StoredResponse
from imgsvc.billing.keys import KeyInfo
from imgsvc.config import Settings
from imgsvc.errors import Conflict, Forbidden, InvalidInput, PayloadTooLarge, ServiceError
from imgsvc.fetch import check_url, fetch
from imgsvc.jobs import manifest, notify, store, sweeper
from imgsvc.jobs.result_zip import ZipEntry, stream_zip
from imgsvc.jobs.runtime import JobsRuntime
from imgsvc.jobs.schema import FINISHED, ITEM_OPEN, Job, JobItem
from imgsvc.jobs.zip_input import ZipLimits, is_zip, read_zip
from imgsvc.operations.catalog import OperationKind, operation_kind
from imgsvc.operations.context import Context
from imgsvc.routes.deps import ApiKeyDep, DatabaseDep
from imgsvc.routes.gate import AdmittedKeyDep, gated_route
from imgsvc.routes.metered import request_fingerprint
from imgsvc.routes.openapi import JobList, JobQuote, JobView, errors, job_request_body

log = logging.getLogger("imgsvc.jobs")
router = APIRouter(prefix="/v1", tags=["jobs"], route_class=gated_route(None))
# Reading and canceling jobs: authenticated, not counted against the rate limit (polling).
reads = APIRouter(prefix="/v1", tags=["jobs"])
JobId = Annotated[str, Path(pattern=r"^job_[0-9a-f]{24}$", description="the job's id")]
RESERVED_FIELDS = {"operation", "options", "files", "file", "urls", "webhook_url"}
MAX_URLS_AT_ONCE = 4


class JobSubmission(BaseModel):
    """The JSON form of a job: images by URL."""

    operation: str
    options: dict[str, Any] = {}
    urls: list[str]
    webhook_url: str | None = None


ASYNC_DESCRIPTION = (
    " With `Prefer: respond-async` the call is checked and priced as it would be, its credits "
    "held, and answered at once: 202 with a one-item job (`Location: /v1/jobs/{id}`, "
    "`Preference-Applied: respond-async`); its output is then at `/v1/jobs/{id}/items/1`. "
    "`?dry_run=true` still only quotes."
)
JOB_DESCRIPTION = (
    "Multipart: `operation`, that operation's options as form fields (or one `options` field "
    "of JSON), the images as repeated `files` parts or one zip in `file`, optionally "
    "`webhook_url`, and a shared `bg_image` (remove-background) or `mask` (inpaint). Or JSON "
    '`{"operation", "options", "urls", "webhook_url"}`. Every item is validated and priced now '
    "and the whole job's credits are held (402 names the amount); an invalid item fails alone, "
    "uncharged. `?dry_run=true` answers the quote and creates nothing. `Idempotency-Key` makes "
    "a retry return the same job."
)


@router.post(
    "/jobs",
    status_code=202,
    summary="Submit a batch job (many images, one operation)",
    description=JOB_DESCRIPTION,
    responses={
        200: {"model": JobQuote, "description": "`?dry_run=true`: the job's quote."},
        202: {"model": JobView, "description": "The job (also at `Location`)."},
        **errors(402, 409, 413, 415, 507),
    },
    openapi_extra={"requestBody": job_request_body(JobSubmission.model_json_schema())},
)
async def submit_job(
    request: Request,
    key: AdmittedKeyDep,
    dry_run: Annotated[bool, Query(description="price the job only; create nothing")] = False,
) -> Response:
    state = request.app.state
    settings: Settings = state.settings
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.job_max_bytes:
        raise PayloadTooLarge(f"the job is {declared} bytes; the limit is {settings.job_max_bytes}")
    request = _capped(request, settings.job_max_bytes)  # a chunked body is counted as it comes
    try:
        return await _submit(request, key, settings, dry_run)
    finally:
        await request.close()  # the spooled upload files


async def _submit(request: Request, key: KeyInfo, settings: Settings, dry_run: bool) -> Response:
    state = request.app.state
    submission = await _read_submission(request, settings)
    kind = operation_kind(submission.operation)
    if not key.may(kind.name):
        raise Forbidden(f"this key may not call {kind.name} (scopes: {' '.join(key.scopes)})")
    options = kind.parse(submission.options)
    ctx: Context = state.context
    if submission.webhook_url is not None:
        await run_in_threadpool(check_url, submission.webhook_url, ctx.fetch, what="webhook_url")
    await run_in_threadpool(_check_shared, submission.shared, ctx)
    items = await _items(submission, settings, ctx)
    priced = await run_in_threadpool(_price, kind, options, items, ctx)
    if dry_run:
        return JSONResponse(_quote_body(kind, priced))
    if not any(it.error is None for it in priced):
        first = next(it for it in priced if it.error is not None)
        assert first.error is not None
        raise InvalidInput(
            f"no item can be processed; item 1 ({first.name[:80]!r}): {first.error.message}",
            extra={"failed": _failures(priced)},
        )
    return await _idempotent(
        request, key, lambda: _create(request, key, kind, options, priced, submission)
    )


async def _idempotent(
    request: Request, key: KeyInfo, create: Callable[[], Awaitable[StoredResponse]]
) -> Response:
    """`create` the job, or with an Idempotency-Key already used by the same request, answer
    that request's job again (`Idempotent-Replayed: true`) without creating or holding more."""
    db = request.app.state.db
    idem_key = request.headers.get("idempotency-key")
    claim: idempotency.Claim | None = None
    if idem_key is not None:
        fingerprint = await request_fingerprint(request)
        # Held for the whole retention: a job stored without its answer (the process died in
        # between) is never created twice by a retry.
        claimed = await run_in_threadpool(
            lambda: idempotency.begin(db, key_id=key.id, idem_key=idem_key, fingerprint=fingerprint)
        )
        if isinstance(claimed, StoredResponse):
            headers = {**claimed.headers, "Idempotent-Replayed": "true"}
            return Response(claimed.body, claimed.status, headers, claimed.media_type)
        claim = claimed
    # Once started, the job is stored and its key completed even if the client hangs up: a
    # retry with the same key then gets this job, never a second one.
    with anyio.CancelScope(shield=True):
        try:
            stored = await create()
        except BaseException:
            if claim is not None:  # refused: the client may retry with the same key
                await run_in_threadpool(idempotency.abort, db, claim)
            raise
        if claim is not None:
            try:
                await run_in_threadpool(idempotency.complete, db, claim, stored)
            except SQLAlchemyError:
                log.exception("job idempotency record not stored")
    return Response(stored.body, stored.status, stored.headers, stored.media_type)


async def respond_async(
    request: Request,
    key: KeyInfo,
    operation: str,
    options: BaseModel,
    image: bytes,
    shared: Mapping[str, bytes] | None = None,
) -> Response:
    """`Prefer: respond-async` on an operation route: the call becomes a one-item job (202).

    The call is checked as the synchronous one would be (the same 4xx, nothing stored), its
    credits are held, and `Idempotency-Key` works as on the route itself."""
    kind = operation_kind(operation)
    ctx: Context = request.app.state.context
    files = dict(shared or {})
    item = _Upload("image", image)

    def checked() -> list[store.NewItem]:
        kind.prepare(options, image, files, ctx)  # refuses what the synchronous call refuses
        return _price(kind, options, [item], ctx)

    priced = await run_in_threadpool(checked)
    if priced[0].error is not None:
        raise priced[0].error
    submission = _Submission(operation, {}, [item], None, files)

    async def create() -> StoredResponse:
        stored = await _create(request, key, kind, options, priced, submission)
        stored.headers["Preference-Applied"] = "respond-async"
        return stored

    return await _idempotent(request, key, create)


def prefers_async(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(p.strip().lower() == "respond-async" for p in prefer.split(","))


@reads.get("/jobs", summary="The caller's jobs, newest first", responses={200: {"model": JobList}})
async def list_jobs(
    request: Request,
    key: ApiKeyDep,
    db: DatabaseDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> dict[str, Any]:
    jobs = await run_in_threadpool(store.list_jobs, db, key.id, limit=limit, offset=offset)
    return {"jobs": [_job_summary(job) for job in jobs], "limit": limit, "offset": offset}


@reads.get(
    "/jobs/{job_id}",
    summary="A job: status, progress, items, credits",
    responses={200: {"model": JobView}, **errors(404)},
)
async def get_job(request: Request, key: ApiKeyDep, db: DatabaseDep, job_id: JobId) -> Any:
    return await run_in_threadpool(_job_view, db, job_id, key.id)


@reads.delete(
    "/jobs/{job_id}",
    summary="Cancel a job: items not started are not charged",
    responses={200: {"model": JobView}, **errors(404)},
)
async def delete_job(request: Request, key: ApiKeyDep, db: DatabaseDep, job_id: JobId) -> Any:
    return await _cancel(db, job_id, key.id)


@reads.post(
    "/jobs/{job_id}/cancel",
    summary="Cancel a job (same as DELETE)",
    responses={200: {"model": JobView}, **errors(404)},
)
async def cancel_job(request: Request, key: ApiKeyDep, db: DatabaseDep, job_id: JobId) -> Any:
    return await _cancel(db, job_id, key.id)


@reads.get(
    "/jobs/{job_id}/result",
    summary="The finished job as a zip: outputs, manifest.csv, manifest.json",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}, **errors(404, 409)},
)
async def job_result(
    request: Request, key: ApiKeyDep, db: DatabaseDep, job_id: JobId
) -> StreamingResponse:
    job, items = await run_in_threadpool(store.get, db, job_id, key.id)
    if job.status not in FINISHED:
        raise Conflict(
            f"job {job_id} is {job.status}; its result is ready when it has finished",
            retry_after_s=2,
        )
    runtime: JobsRuntime = request.app.state.jobs
    entries = [
        ZipEntry(
            it.output_name or f"item-{it.item}", path=runtime.files.path(job.id, it.output_path)
        )
        for it in items
        if it.status == "succeeded" and it.output_path
    ]
    entries += [
        ZipEntry("manifest.csv", data=manifest.as_csv(items), compress=True),
        ZipEntry("manifest.json", data=manifest.as_json(job, items), compress=True),
    ]
    filename = f"{job.id}.zip"
    return StreamingResponse(
        stream_zip(entries),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@reads.get(
    "/jobs/{job_id}/items/{item}",
    summary="One item's output",
    response_class=Response,
    responses={
        200: {
            "content": {
                "image/png": {},
                "image/jpeg": {},
                "image/webp": {},
                "application/zip": {},
            }
        },
        **errors(404, 409),
    },
)
async def job_item(
    request: Request,
    key: ApiKeyDep,
    db: DatabaseDep,
    job_id: JobId,
    item: Annotated[int, Path(ge=1, le=1_000_000)],
) -> Response:
    row = await run_in_threadpool(store.item_of, db, job_id, key.id, item)
    if row.status != "succeeded" or not row.output_path:
        if row.status in ("queued", "running"):
            raise Conflict(f"item {item} is {row.status}", retry_after_s=2)
        raise Conflict(f"item {item} {row.status}: {row.error_message or 'no output'}")
    runtime: JobsRuntime = request.app.state.jobs
    body = await run_in_threadpool(runtime.files.read, job_id, row.output_path)
    return Response(
        body,
        media_type=row.media_type,
        headers={"Content-Disposition": f'attachment; filename="{_basename(row)}"'},
    )


@router.post(
    "/webhooks/secret",
    summary="A new signing secret for this key's job webhooks (shown once; replaces the old)",
)
async def webhook_secret(request: Request, key: AdmittedKeyDep, db: DatabaseDep) -> dict[str, str]:
    secret = await run_in_threadpool(notify.new_secret, db, key.id)
    return {"secret": secret}


# --- submission -----------------------------------------------------------------------------


class _Upload:
    def __init__(self, name: str, data: bytes | None, error: ServiceError | None = None) -> None:
        self.name, self.data, self.error = name, data, error


class _Submission:
    def __init__(
        self,
        operation: str,
        options: dict[str, Any],
        uploads: list[_Upload],
        webhook_url: str | None,
        shared: dict[str, bytes],
        urls: list[str] | None = None,
    ) -> None:
        self.operation, self.options, self.uploads = operation, options, uploads
        self.webhook_url, self.shared, self.urls = webhook_url, shared, urls or []


async def _read_submission(request: Request, settings: Settings) -> _Submission:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = JobSubmission.model_validate_json(await request.body())
        except ValueError as exc:
            raise InvalidInput(f"the job's JSON is not valid: {str(exc)[:200]}") from None
        return _Submission(body.operation, body.options, [], body.webhook_url, {}, body.urls)
    if not content_type.startswith("multipart/form-data"):
        raise InvalidInput("send multipart/form-data (files or a zip) or application/json (urls)")
    try:
        form = await request.form(
            max_files=settings.job_max_items + 4, max_fields=200, max_part_size=1024 * 1024
        )
    except HTTPException as exc:  # the multipart parser's limits (starlette answers 400)
        if "too many files" in str(exc.detail).lower():
            raise PayloadTooLarge(
                f"the job has more than {settings.job_max_items} files; that is the limit"
            ) from None
        raise InvalidInput(f"the form could not be read: {exc.detail}") from None
    operation = form.get("operation")
    if not isinstance(operation, str):
        raise InvalidInput("the form field `operation` is missing")
    options: dict[str, Any] = {}
    raw_options = form.get("options")
    if isinstance(raw_options, str) and raw_options.strip():
        try:
            options = dict(json.loads(raw_options))
        except (ValueError, TypeError):
            raise InvalidInput("`options` must be a JSON object") from None
    kind = operation_kind(operation)
    uploads: list[_Upload] = []
    shared: dict[str, bytes] = {}
    total = 0
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            data = await value.read()
            total += len(data)
            if total > settings.job_max_bytes:
                raise PayloadTooLarge(f"the job's files pass the limit of {settings.job_max_bytes}")
            if name in kind.shared_files:
                shared[name] = data
            elif name in ("files", "file"):
                uploads.extend(
                    _unpack(value.filename or f"item-{len(uploads) + 1}", data, settings)
                )
            else:
                raise InvalidInput(f"unexpected file field {name[:40]!r}: use `files` or `file`")
        elif name not in RESERVED_FIELDS:
            options[name] = value
    webhook = form.get("webhook_url")
    return _Submission(
        operation, options, uploads, webhook if isinstance(webhook, str) else None, shared
    )


def _capped(request: Request, limit: int) -> Request:
    """The request with a body that raises PayloadTooLarge once more than `limit` bytes came:
    a body without Content-Length (chunked) is not spooled past the limit."""
    receive = request.receive
    seen = 0

    async def capped_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the job passes the limit of {limit} bytes")
        return message

    return Request(request.scope, capped_receive)


def _check_shared(shared: Mapping[str, bytes], ctx: Context) -> None:
    """A background or mask every item uses must be an image: refused now, not item by item."""
    for name, data in shared.items():
        images.decode(data, ctx.limits, what=name)


def _unpack(filename: str, data: bytes, settings: Settings) -> list[_Upload]:
    """One upload as items: a zip's members one by one, or the image itself."""
    if not is_zip(data):
        return [_Upload(_item_name(filename), data)]
    limits = ZipLimits(
        max_members=settings.job_max_items,
        max_total_bytes=settings.job_max_bytes,
        max_member_bytes=settings.max_upload_bytes,
    )
    return [_Upload(m.name, m.data, m.error) for m in read_zip(data, limits)]


def _item_name(filename: str) -> str:
    """An uploaded file's name as an item's relative path (folders kept, nothing unsafe)."""
    parts = [p for p in filename.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    cleaned = "/".join("".join(ch for ch in p if ch.isprintable()) for p in parts)
    return cleaned[-200:] or "image"


async def _items(submission: _Submission, settings: Settings, ctx: Context) -> list[_Upload]:
    uploads = list(submission.uploads)
    if submission.urls:
        if uploads:
            raise InvalidInput("send the images as files or as urls, not both")
        if len(submission.urls) > settings.job_max_items:
            raise PayloadTooLarge(f"a job holds at most {settings.job_max_items} items")
        uploads = await run_in_threadpool(_fetch_all, submission.urls, ctx)
    if not uploads:
        raise InvalidInput("the job has no images: send `files`, a zip in `file`, or `urls`")
    if len(uploads) > settings.job_max_items:
        raise PayloadTooLarge(
            f"the job has {len(uploads)} items; the limit is {settings.job_max_items}"
        )
    return uploads


def _fetch_all(urls: list[str], ctx: Context) -> list[_Upload]:
    from concurrent.futures import ThreadPoolExecutor

    def one(n_url: tuple[int, str]) -> _Upload:
        n, url = n_url
        name = _item_name(url.split("?", 1)[0].rsplit("/", 1)[-1]) or f"url-{n}"
        try:
            return _Upload(name, fetch(url, ctx.fetch, what=f"urls[{n - 1}]"))
        except ServiceError as exc:
            return _Upload(name, None, exc)

    with ThreadPoolExecutor(MAX_URLS_AT_ONCE) as pool:
        return list(pool.map(one, enumerate(urls, start=1)))


def _price(
    kind: OperationKind, options: BaseModel, uploads: list[_Upload], ctx: Context
) -> list[store.NewItem]:
    priced = []
    for up in uploads:
        if up.error is not None or up.data is None:
            priced.append(store.NewItem(up.name, None, error=up.error or InvalidInput("empty")))
            continue
        try:
            quote = kind.quote_image(options, up.data, ctx)
        except ServiceError as exc:
            priced.append(store.NewItem(up.name, None, error=exc))
            continue
        priced.append(store.NewItem(up.name, up.data, quote.credits, quote.price_version))
    return priced


def _failures(priced: list[store.NewItem]) -> list[dict[str, Any]]:
    return [
        {"item": n, "name": it.name, "error": {"code": it.error.code, "message": it.error.message}}
        for n, it in enumerate(priced, start=1)
        if it.error is not None
    ]


def _quote_body(kind: OperationKind, priced: list[store.NewItem]) -> dict[str, Any]:
    ok = [it for it in priced if it.error is None]
    return {
        "operation": kind.name,
        "items": len(ok),
        "credits": sum(it.credits for it in ok),
        "price_version": next((it.price_version for it in ok), None),
        "failed": _failures(priced),
    }


async def _create(
    request: Request,
    key: KeyInfo,
    kind: OperationKind,
    options: BaseModel,
    priced: list[store.NewItem],
    submission: _Submission,
) -> StoredResponse:
    state = request.app.state
    settings: Settings = state.settings
    runtime: JobsRuntime = state.jobs
    db = state.db
    new = store.NewJob(
        operation=kind.name,
        options=options.model_dump(mode="json", exclude_unset=True),
        items=priced,
        shared=submission.shared,
        request_id=request.state.request_id,
        result_url=str(request.base_url).rstrip("/") + "/v1/jobs",
        client_ref=getattr(request.state, "client_ref", None),
        webhook_url=submission.webhook_url,
        retention=timedelta(hours=settings.job_retention_hours),
    )
    secret = None
    if submission.webhook_url is not None:
        # Made before the job (a job that finishes at once finds it), shown with this job only;
        # forgotten again when the job is not created, so that the next job shows one.
        secret = await run_in_threadpool(notify.first_secret, db, key.id)
    try:
        job = await run_in_threadpool(
            lambda: store.create(
                db, runtime.files, key, new, hold_ttl=timedelta(hours=settings.job_hold_hours)
            )
        )
    except BaseException:
        if secret is not None:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(notify.forget_secret, db, key.id, secret)
        raise
    try:
        await run_in_threadpool(sweeper.dispatch_new, db, runtime.dispatcher, job.id)
    except Exception:
        # The items are stored; the sweeper publishes what was not published.
        log.exception("job %s: publishing failed; left to the sweeper", job.id)
    view = await run_in_threadpool(_job_view, db, job.id, key.id)
    if secret is not None:
        view["webhook_secret"] = secret  # shown once: sign-checking needs it
    headers = {"Location": f"/v1/jobs/{job.id}", **getattr(request.state, "extra_headers", {})}
    body = json.dumps(view).encode()
    return StoredResponse(202, headers, body, "application/json")


async def _cancel(db: Any, job_id: str, key_id: int) -> Any:
    await run_in_threadpool(store.cancel, db, job_id, key_id)
    return await run_in_threadpool(_job_view, db, job_id, key_id)


# --- views ----------------------------------------------------------------------------------


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="seconds") + "Z"


def _basename(row: JobItem) -> str:
    name = (row.output_name or f"item-{row.item}").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable() and ch not in '"\\')


def _job_summary(job: Job) -> dict[str, Any]:
    done = job.succeeded + job.failed + job.canceled
    return {
        "id": job.id,
        "operation": job.operation,
        "status": job.status,
        "created_at": _ts(job.created_at),
        "finished_at": _ts(job.finished_at),
        "expires_at": _ts(job.expires_at),
        "progress": {
            "total": job.total,
            "done": done,
            "succeeded": job.succeeded,
            "failed": job.failed,
            "canceled": job.canceled,
        },
        "credits": {"quoted": job.credits_quoted, "charged": job.credits_charged},
        "result_url": f"/v1/jobs/{job.id}/result",
    }


def _job_view(db: Any, job_id: str, key_id: int) -> dict[str, Any]:
    job, items = store.get(db, job_id, key_id)
    view = _job_summary(job)
    counts = {s: 0 for s in ("queued", "running", "succeeded", "failed", "canceled")}
    for it in items:
        counts[it.status] = counts.get(it.status, 0) + 1
    view["progress"] = {"total": job.total, **counts}
    view["queue_position"] = store.queue_position(db, job)
    view["webhook"] = None
    if job.webhook_url:
        view["webhook"] = {
            "url": job.webhook_url,
            "status": job.webhook_status,
            "deliveries": [
                {
                    "attempt": d.attempt,
                    "status_code": d.status_code,
                    "error": d.error,
                    "at": _ts(d.at),
                }
                for d in store.deliveries(db, job.id)
            ],
        }
    view["items"] = [
        {
            "item": it.item,
            "name": it.name,
            "status": it.status,
            "attempts": it.attempts,
            # charged once it succeeded, held while it is open, nothing once failed or canceled
            "credits": (it.charged or 0)
            if it.status == "succeeded"
            else (it.credits if it.status in ITEM_OPEN else 0),
            "error": None
            if it.error_code is None
            else {"code": it.error_code, "message": it.error_message},
            "output_name": it.output_name if it.status == "succeeded" else None,
            "output_width": it.output_width,
            "output_height": it.output_height,
            "model": it.model,
            "url": f"/v1/jobs/{job.id}/items/{it.item}",
        }
        for it in items
    ]
    return view
