"""The job store: create a job (its items' holds taken in the same transaction), claim an item
under a lease, finish it, cancel, read.

Why a duplicate delivery is harmless: an item is claimed only while it is open and its lease is
free or expired (one conditional UPDATE), and its success, its capture and the job's counters
commit in one transaction that first locks the job row and only moves the item from `running`;
the usage row's unique (job, item) stops a second charge even if all else failed. A poison item
(one that kills or fails its worker every time) ends `failed` after `max_attempts` claims.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from imgsvc.billing import metering
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import UsageRecord
from imgsvc.billing.schema import utcnow
from imgsvc.errors import NotFound, ServiceError
from imgsvc.jobs.files import JobFiles
from imgsvc.jobs.schema import ITEM_OPEN, Job, JobItem, WebhookDelivery
from imgsvc.jobs.zip_input import safe_member_name

log = logging.getLogger("imgsvc.jobs")


@dataclass(frozen=True)
class NewItem:
    """An item as submitted: its bytes and price, or why it failed before any work."""

    name: str
    data: bytes | None
    credits: int = 0
    price_version: str | None = None
    error: ServiceError | None = None


@dataclass(frozen=True)
class NewJob:
    operation: str
    options: dict[str, object]
    items: Sequence[NewItem]
    shared: dict[str, bytes]
    request_id: str
    result_url: str  # where the result will be (absolute); the job id is appended
    client_ref: str | None = None
    webhook_url: str | None = None
    retention: timedelta = timedelta(hours=24)


@dataclass(frozen=True)
class Claimed:
    """An item a worker holds the lease of."""

    id: int
    job_id: str
    item: int
    operation: str
    options: dict[str, object]
    input_path: str
    output_stem: str
    hold_id: int | None
    credits: int
    account_id: int
    key_id: int
    client_ref: str | None
    attempts: int
    owner: str


@dataclass(frozen=True)
class Output:
    """What a finished item produced, as the store records it."""

    path: str  # relative to the job's folder
    ext: str
    media_type: str
    model: str
    model_version: str | None
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    credits: int
    price_version: str
    duration_ms: int


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def create(
    db: Database,
    files: JobFiles,
    key: KeyInfo,
    job: NewJob,
    *,
    hold_ttl: timedelta,
    job_id: str | None = None,
) -> Job:
    """Store the inputs, then the job, its items and their holds in one transaction.

    InsufficientCredits / MonthlyCapReached (nothing held, nothing stored) when the account
    cannot pay for every valid item. Items that failed at submission are stored failed.
    """
    job_id = job_id or new_job_id()
    try:
        paths = [
            None if it.data is None else files.write_input(job_id, n, it.data)
            for n, it in enumerate(job.items, start=1)
        ]
        for name, data in job.shared.items():
            files.write_shared(job_id, name, data)
        with db.transaction() as s:
            row = _insert(s, key, job, job_id, paths, hold_ttl)
    except BaseException:
        files.delete_job(job_id)
        raise
    return row


def _insert(
    s: Session,
    key: KeyInfo,
    job: NewJob,
    job_id: str,
    paths: list[str | None],
    hold_ttl: timedelta,
) -> Job:
    now = utcnow()
    ok = [n for n, it in enumerate(job.items, start=1) if it.error is None]
    failed = len(job.items) - len(ok)
    price_version = next((it.price_version for it in job.items if it.price_version), None)
    holds = metering.reserve_in(
        s,
        key=key,
        amounts=[job.items[n - 1].credits for n in ok],
        request_ids=[item_request_id(job_id, n) for n in ok],
        expires_at=now + hold_ttl,
        price_version=price_version,
    )
    hold_of = dict(zip(ok, holds, strict=True))
    row = Job(
        id=job_id,
        account_id=key.account_id,
        key_id=key.id,
        operation=job.operation,
        options=json.dumps(job.options, sort_keys=True),
        status="queued",
        total=len(job.items),
        failed=failed,
        credits_quoted=sum(job.items[n - 1].credits for n in ok),
        client_ref=job.client_ref,
        request_id=job.request_id,
        webhook_url=job.webhook_url,
        result_url=f"{job.result_url.rstrip('/')}/{job_id}/result",
        retention_s=int(job.retention.total_seconds()),
        created_at=now,
    )
    s.add(row)
    s.flush()
    stems = _output_stems([it.name for it in job.items])
    for n, (it, path) in enumerate(zip(job.items, paths, strict=True), start=1):
        s.add(
            JobItem(
                job_id=job_id,
                item=n,
                name=it.name,
                status="queued" if it.error is None else "failed",
                input_path=path,
                output_name=stems[n - 1],
                hold_id=hold_of.get(n),
                credits=it.credits if it.error is None else 0,
                error_code=None if it.error is None else it.error.code,
                error_message=None if it.error is None else it.error.message,
                finished_at=None if it.error is None else now,
            )
        )
    if not ok:
        _finish(s, row, now)
    return row


def item_request_id(job_id: str, item: int) -> str:
    """The request id of an item's hold and usage row."""
    return f"{job_id}.{item}"


def _output_stems(names: list[str]) -> list[str]:
    """Each item's output path without its extension: the input's path (when it is a safe
    relative path), made unique."""
    seen: set[str] = set()
    out = []
    for n, name in enumerate(names, start=1):
        safe = safe_member_name(name) or ""
        stem = safe.rsplit(".", 1)[0] if "." in safe.rsplit("/", 1)[-1] else safe
        stem = stem or f"item-{n}"
        if stem.lower() in seen:
            stem = f"{stem}-{n}"
        seen.add(stem.lower())
        out.append(stem)
    return out


# --- claiming and leases -------------------------------------------------------------------


def claimable(
    db: Database, *, operations: Sequence[str] | None = None, limit: int = 8
) -> list[int]:
    """Items a local worker could claim now (queued, or running under an expired lease)."""
    now = utcnow()
    query = (
        select(JobItem.id)
        .join(Job, Job.id == JobItem.job_id)
        .where(
            or_(
                JobItem.status == "queued",
                (JobItem.status == "running") & (JobItem.lease_expires_at < now),
            )
        )
        .order_by(JobItem.id)
        .limit(limit)
    )
    if operations is not None:
        query = query.where(Job.operation.in_(operations))
    with db.read() as s:
        return list(s.scalars(query))


def claim(
    db: Database, item_id: int, *, owner: str, lease: timedelta, max_attempts: int
) -> Claimed | None:
    """Take the item's lease if it is open and its lease free or expired; None otherwise (done,
    canceled, or leased by a live worker). An item already claimed `max_attempts` times whose
    lease ran out again is failed as poison instead."""
    now = utcnow()
    claimed: Claimed | None = None
    poisoned: str | None = None
    # Not waiting for the disk: a claim forgotten by a crash only lets the item run again.
    with db.transaction(durable=False) as s:
        row = s.execute(
            update(JobItem)
            .where(
                JobItem.id == item_id,
                JobItem.status.in_(ITEM_OPEN),
                or_(JobItem.lease_expires_at.is_(None), JobItem.lease_expires_at < now),
                JobItem.attempts < max_attempts,
            )
            .values(
                status="running",
                lease_owner=owner,
                lease_expires_at=now + lease,
                attempts=JobItem.attempts + 1,
                started_at=func.coalesce(JobItem.started_at, now),
            )
            .returning(
                JobItem.job_id,
                JobItem.item,
                JobItem.input_path,
                JobItem.output_name,
                JobItem.hold_id,
                JobItem.credits,
                JobItem.attempts,
            )
            .execution_options(synchronize_session=False)
        ).one_or_none()
        if row is not None:
            job = _job_facts(s, row.job_id)
            claimed = Claimed(
                id=item_id,
                job_id=row.job_id,
                item=row.item,
                operation=job.operation,
                options=json.loads(job.options),
                input_path=row.input_path or "",
                output_stem=row.output_name or f"item-{row.item}",
                hold_id=row.hold_id,
                credits=row.credits,
                account_id=job.account_id,
                key_id=job.key_id,
                client_ref=job.client_ref,
                attempts=row.attempts,
                owner=owner,
            )
        else:
            item = s.get(JobItem, item_id)
            if (
                item is not None
                and item.status in ITEM_OPEN
                and item.attempts >= max_attempts
                and (item.lease_expires_at is None or item.lease_expires_at < now)
            ):
                _fail_in(
                    s,
                    item,
                    "attempts_exhausted",
                    f"the item was tried {item.attempts} times and never finished; "
                    "it is not charged",
                )
                poisoned = item.job_id
    if poisoned is not None:
        finish_if_done(db, poisoned)
    return claimed


@dataclass(frozen=True)
class _JobFacts:
    """What never changes about a job once stored (cached per process)."""

    operation: str
    options: str
    account_id: int
    key_id: int
    client_ref: str | None


_FACTS: dict[str, _JobFacts] = {}
_FACTS_MAX = 1024


def _job_facts(s: Session, job_id: str) -> _JobFacts:
    facts = _FACTS.get(job_id)
    if facts is None:
        row = s.execute(
            select(Job.operation, Job.options, Job.account_id, Job.key_id, Job.client_ref).where(
                Job.id == job_id
            )
        ).one()
        facts = _JobFacts(row.operation, row.options, row.account_id, row.key_id, row.client_ref)
        if len(_FACTS) >= _FACTS_MAX:
            _FACTS.clear()
        _FACTS[job_id] = facts
    return facts


def extend_leases(db: Database, item_ids: Sequence[int], *, owner: str, lease: timedelta) -> None:
    """The heartbeat of a worker's running items (and of their holds)."""
    now = utcnow()
    with db.transaction(durable=False) as s:
        s.execute(
            update(JobItem)
            .where(
                JobItem.id.in_(item_ids),
                JobItem.status == "running",
                JobItem.lease_owner == owner,
            )
            .values(lease_expires_at=now + lease)
        )


def release_lease(db: Database, claimed: Claimed) -> None:
    """Give an item back to the queue (its worker stops without finishing it)."""
    with db.transaction() as s:
        s.execute(
            update(JobItem)
            .where(
                JobItem.id == claimed.id,
                JobItem.status == "running",
                JobItem.lease_owner == claimed.owner,
            )
            .values(status="queued", lease_owner=None, lease_expires_at=None)
        )


# --- finishing ------------------------------------------------------------------------------


def succeed(db: Database, claimed: Claimed, out: Output) -> bool:
    """Record the output and charge it, in one transaction. False when the item was already
    finished by another delivery (or canceled): then nothing is charged or recorded."""
    now = utcnow()
    try:
        with db.transaction() as s:
            res = s.execute(
                update(JobItem)
                .execution_options(synchronize_session=False)
                .where(JobItem.id == claimed.id, JobItem.status == "running")
                .values(
                    status="succeeded",
                    output_path=out.path,
                    output_name=f"{claimed.output_stem}{out.ext}",
                    media_type=out.media_type,
                    model=out.model,
                    model_version=out.model_version,
                    input_width=out.input_size[0],
                    input_height=out.input_size[1],
                    output_width=out.output_size[0],
                    output_height=out.output_size[1],
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now,
                )
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                return False
            charged = 0
            if claimed.hold_id is not None:
                charged = metering.capture_in(
                    s,
                    hold_id=claimed.hold_id,
                    credits=out.credits,
                    account_id=claimed.account_id,
                    key_id=claimed.key_id,
                    request_id=item_request_id(claimed.job_id, claimed.item),
                    usage=UsageRecord(
                        operation=claimed.operation,
                        model=out.model,
                        input_size=out.input_size,
                        output_size=out.output_size,
                        duration_ms=out.duration_ms,
                        price_version=out.price_version,
                        client_ref=claimed.client_ref,
                    ),
                    job_item=(claimed.job_id, claimed.item),
                )
            s.execute(
                update(JobItem)
                .where(JobItem.id == claimed.id)
                .values(charged=charged)
                .execution_options(synchronize_session=False)
            )
            last = not _any_open(s, claimed.job_id)
    except IntegrityError:
        log.warning("item %s.%d: a second capture was refused", claimed.job_id, claimed.item)
        return False
    # Only the last item marks the job (two last items at once: one of them, or the sweeper).
    if last:
        finish_if_done(db, claimed.job_id)
    return True


def _any_open(s: Session, job_id: str) -> bool:
    return (
        s.scalar(
            select(JobItem.id)
            .where(JobItem.job_id == job_id, JobItem.status.in_(ITEM_OPEN))
            .limit(1)
        )
        is not None
    )


def fail(db: Database, claimed: Claimed, error: ServiceError) -> bool:
    """The item cannot succeed (bad input, or attempts exhausted): failed, hold released."""
    with db.transaction() as s:
        item = s.get_one(JobItem, claimed.id)
        if item.status != "running":
            return False
        _fail_in(s, item, error.code, error.message)
    finish_if_done(db, claimed.job_id)
    return True


def _fail_in(s: Session, item: JobItem, code: str, message: str) -> None:
    item.status = "failed"
    item.error_code, item.error_message = code, message[:1000]
    item.lease_owner, item.lease_expires_at, item.finished_at = None, None, utcnow()
    if item.hold_id is not None:
        metering.release_in(s, hold_id=item.hold_id)


def cancel(db: Database, job_id: str, key_id: int) -> Job:
    """Cancel the items not started (their holds released); running items finish."""
    now = utcnow()
    with db.transaction() as s:
        job = _lock_job(s, job_id)
        if job.key_id != key_id or job.status == "expired":
            raise NotFound("no such job")
        if job.finished_at is None:
            job.cancel_requested = True
            queued = list(
                s.scalars(
                    select(JobItem).where(JobItem.job_id == job_id, JobItem.status == "queued")
                )
            )
            for item in queued:
                item.status, item.finished_at = "canceled", now
                if item.hold_id is not None:
                    metering.release_in(s, hold_id=item.hold_id)
    finish_if_done(db, job_id)
    return get(db, job_id, key_id)[0]


def _lock_job(s: Session, job_id: str) -> Job:
    """The job row, locked until the transaction ends (PostgreSQL; SQLite locks the database)."""
    job = s.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
    if job is None:
        raise NotFound("no such job")
    return job


def finish_if_done(db: Database, job_id: str) -> bool:
    """Mark the job finished once no item is open (its counters, status, expiry, webhook).

    Called after an item's own commit (never holding the job row while items run), by the item
    that saw itself last, and by the sweeper for the rare case two last items committed at once
    and each saw the other still open. The job row lock makes one finisher."""
    with db.transaction() as s:
        if _any_open(s, job_id):
            return False
        job = s.scalars(
            select(Job).where(Job.id == job_id, Job.finished_at.is_(None)).with_for_update()
        ).one_or_none()
        if job is None:
            return False
        _count(s, job)
        _finish(s, job, utcnow())
        return True


def _count(s: Session, job: Job) -> None:
    """Fill the job's counters from its items (stored when it finishes; read while it runs)."""
    counts: dict[str, int] = {
        str(status): int(n)
        for status, n in s.execute(
            select(JobItem.status, func.count())
            .where(JobItem.job_id == job.id)
            .group_by(JobItem.status)
        )
    }
    job.succeeded = counts.get("succeeded", 0)
    job.failed = counts.get("failed", 0)
    job.canceled = counts.get("canceled", 0)
    job.credits_charged = int(
        s.scalar(
            select(func.coalesce(func.sum(JobItem.charged), 0)).where(JobItem.job_id == job.id)
        )
        or 0
    )
    if job.finished_at is None and job.status == "queued" and len(counts) > 0:
        started = sum(n for status, n in counts.items() if status != "queued")
        if started:
            job.status = "running"


def _finish(s: Session, job: Job, now: datetime) -> None:
    if job.cancel_requested:
        job.status = "canceled"
    elif job.failed == 0 and job.canceled == 0:
        job.status = "succeeded"
    elif job.succeeded == 0:
        job.status = "failed"
    else:
        job.status = "partially_failed"
    job.finished_at = now
    job.expires_at = now + timedelta(seconds=job.retention_s)
    if job.webhook_url:
        job.webhook_status, job.webhook_next_at = "pending", now


# --- reading --------------------------------------------------------------------------------


def get(db: Database, job_id: str, key_id: int) -> tuple[Job, list[JobItem]]:
    """A job of this key with its items; NotFound for any other key, or once it expired."""
    with db.read() as s:
        job = s.get(Job, job_id)
        if job is None or job.key_id != key_id or job.status == "expired":
            raise NotFound("no such job")
        items = list(
            s.scalars(select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.item))
        )
        _live(s, job)
        return job, items


def _live(s: Session, job: Job) -> None:
    """A running job's counters and status, read from its items (never written back)."""
    if job.finished_at is None:
        s.expunge(job)
        _count(s, job)


def deliveries(db: Database, job_id: str) -> list[WebhookDelivery]:
    with db.read() as s:
        return list(
            s.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.job_id == job_id)
                .order_by(WebhookDelivery.id)
            )
        )


def queue_position(db: Database, job: Job) -> int | None:
    """How many items of other jobs of the same operation are queued ahead of this job."""
    if job.status != "queued":
        return None
    with db.read() as s:
        ahead = s.scalar(
            select(func.count())
            .select_from(JobItem)
            .join(Job, Job.id == JobItem.job_id)
            .where(
                JobItem.status == "queued",
                Job.operation == job.operation,
                Job.created_at < job.created_at,
            )
        )
        return int(ahead or 0)


def list_jobs(db: Database, key_id: int, *, limit: int, offset: int) -> list[Job]:
    with db.read() as s:
        jobs = list(
            s.scalars(
                select(Job)
                .where(Job.key_id == key_id, Job.status != "expired")
                .order_by(Job.created_at.desc(), Job.id.desc())
                .limit(limit)
                .offset(offset)
            )
        )
        for job in jobs:
            _live(s, job)
        return jobs


def item_of(db: Database, job_id: str, key_id: int, item: int) -> JobItem:
    with db.read() as s:
        job = s.get(Job, job_id)
        if job is None or job.key_id != key_id or job.status == "expired":
            raise NotFound("no such job")
        row = s.scalars(
            select(JobItem).where(JobItem.job_id == job_id, JobItem.item == item)
        ).one_or_none()
        if row is None:
            raise NotFound(f"job {job_id} has no item {item}")
        return row
