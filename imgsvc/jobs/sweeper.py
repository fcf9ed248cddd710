"""Periodic upkeep of the job store, run by every API process and worker (each step is safe to
run concurrently): re-queue items whose worker died (lease expired) or whose message was never
published, and expire finished jobs past their retention (files deleted, 404 afterwards)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import or_, select, update

from imgsvc.billing.db import Database
from imgsvc.billing.schema import utcnow
from imgsvc.jobs import store
from imgsvc.jobs.files import JobFiles
from imgsvc.jobs.schema import FINISHED, ITEM_OPEN, Job, JobItem

log = logging.getLogger("imgsvc.jobs")
ORPHAN_AGE = timedelta(hours=1)  # a job folder with no job row (a submission that crashed)


class Dispatcher(Protocol):
    def dispatch(self, items: Sequence[tuple[int, str]]) -> None: ...


def dispatch_new(db: Database, dispatcher: Dispatcher, job_id: str) -> int:
    """Publish a new job's queued items, marking them dispatched."""
    now = utcnow()
    with db.transaction(durable=False) as s:
        rows = list(
            s.execute(
                select(JobItem.id, Job.operation)
                .join(Job, Job.id == JobItem.job_id)
                .where(JobItem.job_id == job_id, JobItem.status == "queued")
                .order_by(JobItem.item)
            )
        )
        s.execute(
            update(JobItem)
            .where(JobItem.job_id == job_id, JobItem.status == "queued")
            .values(dispatched_at=now)
        )
    items = [(int(i), str(op)) for i, op in rows]
    dispatcher.dispatch(items)
    return len(items)


def redispatch(
    db: Database, dispatcher: Dispatcher, *, stale_after: timedelta, now: datetime | None = None
) -> int:
    """Publish again every item whose lease expired, or that is queued and was never published
    (or not for `stale_after`). Each item is taken by one sweeper (a conditional UPDATE)."""
    now = now or utcnow()
    with db.read() as s:
        candidates = list(
            s.execute(
                select(JobItem.id, Job.operation, JobItem.dispatched_at)
                .join(Job, Job.id == JobItem.job_id)
                .where(
                    or_(
                        (JobItem.status == "running")
                        & (JobItem.lease_expires_at < now)
                        & (
                            JobItem.dispatched_at.is_(None)
                            | (JobItem.dispatched_at < JobItem.lease_expires_at)
                            | (JobItem.dispatched_at < now - stale_after)
                        ),
                        (JobItem.status == "queued")
                        & (
                            JobItem.dispatched_at.is_(None)
                            | (JobItem.dispatched_at < now - stale_after)
                        ),
                    )
                )
                .limit(1000)
            )
        )
    taken: list[tuple[int, str]] = []
    for item_id, operation, dispatched_at in candidates:
        # Not again within a lease or so: the message just published may be on its way.
        if dispatched_at is not None and dispatched_at > now - timedelta(seconds=1):
            continue
        with db.transaction(durable=False) as s:
            cond = (
                JobItem.dispatched_at.is_(None)
                if dispatched_at is None
                else JobItem.dispatched_at == dispatched_at
            )
            res = s.execute(
                update(JobItem).where(JobItem.id == item_id, cond).values(dispatched_at=now)
            )
            if res.rowcount == 1:  # type: ignore[attr-defined]
                taken.append((int(item_id), str(operation)))
    if taken:
        log.info("re-queued %d job item(s)", len(taken))
        dispatcher.dispatch(taken)
    return len(taken)


def finish_stragglers(db: Database) -> int:
    """Finish jobs whose last item committed but whose process died before marking the job."""
    open_items = (
        select(JobItem.id).where(JobItem.job_id == Job.id, JobItem.status.in_(ITEM_OPEN)).exists()
    )
    with db.read() as s:
        ids = list(
            s.scalars(
                select(Job.id)
                .where(Job.finished_at.is_(None), Job.status != "expired", ~open_items)
                .limit(100)
            )
        )
    return sum(store.finish_if_done(db, job_id) for job_id in ids)


def expire(db: Database, files: JobFiles, *, now: datetime | None = None) -> int:
    """Delete the files of finished jobs past their retention; their ids answer 404 after."""
    now = now or utcnow()
    with db.read() as s:
        ids = list(s.scalars(select(Job.id).where(Job.status.in_(FINISHED), Job.expires_at < now)))
    for job_id in ids:
        with db.transaction() as s:
            s.execute(
                update(Job)
                .where(Job.id == job_id, Job.status.in_(FINISHED))
                .values(status="expired")
            )
        files.delete_job(job_id)
    _delete_orphans(db, files)
    if ids:
        log.info("expired %d job(s)", len(ids))
    return len(ids)


def _delete_orphans(db: Database, files: JobFiles) -> None:
    on_disk = files.job_ids_on_disk()
    if not on_disk:
        return
    with db.read() as s:
        known = set(s.scalars(select(Job.id).where(Job.id.in_(on_disk))))
    for job_id in on_disk:
        folder = files.job_dir(job_id)
        if job_id in known:
            continue
        age = time.time() - folder.stat().st_mtime
        if age > ORPHAN_AGE.total_seconds():
            files.delete_job(job_id)
