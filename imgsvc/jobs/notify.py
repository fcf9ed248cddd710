"""Webhook deliveries of finished jobs, durable: a job that finishes is marked `pending`; any
API process delivers it (taking it with a conditional UPDATE, so one sender per attempt),
records the attempt on the job, and schedules the next one with backoff and jitter until it is
delivered, refused for good (410, other 4xx) or out of retries."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from imgsvc.billing.db import Database
from imgsvc.billing.schema import utcnow
from imgsvc.fetch import FetchPolicy
from imgsvc.jobs import webhooks
from imgsvc.jobs.schema import Job, WebhookDelivery, WebhookSecret

log = logging.getLogger("imgsvc.jobs")


def secret_of(db: Database, key_id: int) -> str | None:
    with db.read() as s:
        return s.scalar(select(WebhookSecret.secret).where(WebhookSecret.key_id == key_id))


def new_secret(db: Database, key_id: int) -> str:
    """A new signing secret for the key's webhooks (replaces the old one); shown once."""
    secret = webhooks.new_secret()
    with db.transaction() as s:
        row = s.get(WebhookSecret, key_id)
        if row is None:
            s.add(WebhookSecret(key_id=key_id, secret=secret))
        else:
            row.secret, row.created_at = secret, utcnow()
    return secret


def first_secret(db: Database, key_id: int) -> str | None:
    """A signing secret for a key that has none, made now and returned (to be shown once);
    None when the key has one already (two first jobs at once: only one of them makes it)."""
    secret = webhooks.new_secret()
    try:
        with db.transaction() as s:
            if s.get(WebhookSecret, key_id) is not None:
                return None
            s.add(WebhookSecret(key_id=key_id, secret=secret))
    except IntegrityError:
        return None
    return secret


def forget_secret(db: Database, key_id: int, secret: str) -> None:
    """Undo `first_secret` (its job was not created): the key's next job shows a new one."""
    with db.transaction() as s:
        s.execute(
            delete(WebhookSecret).where(
                WebhookSecret.key_id == key_id, WebhookSecret.secret == secret
            )
        )


def payload(job: Job) -> bytes:
    """The webhook body: small, with a link to the result (Standard Webhooks' envelope)."""
    finished = job.finished_at or utcnow()
    body = {
        "type": "job.finished",
        "timestamp": finished.isoformat(timespec="seconds") + "Z",
        "data": {
            "id": job.id,
            "status": job.status,
            "operation": job.operation,
            "total": job.total,
            "succeeded": job.succeeded,
            "failed": job.failed,
            "canceled": job.canceled,
            "credits_charged": job.credits_charged,
            "result_url": job.result_url,
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def deliver_due(
    db: Database, policy: FetchPolicy, schedule: Sequence[float], *, now: datetime | None = None
) -> int:
    """Make every webhook attempt that is due; return how many were made."""
    now = now or utcnow()
    with db.read() as s:
        due = list(
            s.execute(
                select(Job.id, Job.webhook_next_at)
                .where(Job.webhook_status == "pending", Job.webhook_next_at <= now)
                .limit(100)
            )
        )
    made = 0
    for job_id, next_at in due:
        with db.transaction(durable=False) as s:  # take it: nobody else sends this attempt
            res = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.webhook_next_at == next_at)
                .values(webhook_next_at=now + timedelta(seconds=policy.timeout_s * 3))
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                continue
        _attempt(db, job_id, policy, schedule)
        made += 1
    return made


def _attempt(db: Database, job_id: str, policy: FetchPolicy, schedule: Sequence[float]) -> None:
    with db.read() as s:
        job = s.get_one(Job, job_id)
        secret = s.scalar(select(WebhookSecret.secret).where(WebhookSecret.key_id == job.key_id))
    if secret is None or job.webhook_url is None:
        _record(db, job_id, None, "no webhook secret for this key", final="failed")
        return
    msg_id = f"msg_{job.id}"  # the same id on every retry: receivers can deduplicate
    attempt = webhooks.attempt_delivery(job.webhook_url, secret, msg_id, payload(job), policy)
    if attempt.delivered:
        _record(db, job_id, attempt.status_code, None, final="delivered")
        return
    delay = webhooks.retry_delay(job.webhook_attempts + 1, schedule) if attempt.retry else None
    _record(
        db,
        job_id,
        attempt.status_code,
        attempt.error,
        final="failed" if delay is None else None,
        delay=delay,
    )


def _record(
    db: Database,
    job_id: str,
    status_code: int | None,
    error: str | None,
    *,
    final: str | None,
    delay: float | None = None,
) -> None:
    now = utcnow()
    with db.transaction() as s:
        job = s.get_one(Job, job_id)
        job.webhook_attempts += 1
        s.add(
            WebhookDelivery(
                job_id=job_id,
                attempt=job.webhook_attempts,
                status_code=status_code,
                error=None if error is None else error[:200],
                at=now,
            )
        )
        if final is not None:
            job.webhook_status, job.webhook_next_at = final, None
        else:
            job.webhook_next_at = now + timedelta(seconds=delay or 0)
    if final == "failed":
        log.warning("job %s: webhook not delivered (%s)", job_id, error or status_code)
