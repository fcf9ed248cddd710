"""Reserve credits before work, capture on success, release on failure.

The reservation is one conditional UPDATE (`credits >= n`), so concurrent calls can never
overdraw; each balance change writes a ledger row in the same transaction.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from datetime import datetime

from sqlalchemy import func, select, update

from imgsvc.billing.db import Database
from imgsvc.billing.schema import ApiKey, LedgerEntry, UsageEvent
from imgsvc.errors import InsufficientCredits, Unauthorized


@dataclass(frozen=True)
class UsageRecord:
    """What a successful call did, as stored on its usage row."""

    operation: str
    model: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    duration_ms: int


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    operation: str
    model: str
    input_width: int
    input_height: int
    output_width: int
    output_height: int
    credits: int
    duration_ms: int
    created_at: datetime


def reserve(db: Database, *, key_id: int, credits: int, request_id: str) -> None:
    """Take `credits` from the key or raise InsufficientCredits; nothing is taken on refusal."""
    with db.transaction() as s:
        res = s.execute(
            update(ApiKey)
            .where(
                ApiKey.id == key_id,
                ApiKey.credits >= credits,
                ApiKey.revoked_at.is_(None),
            )
            .values(credits=ApiKey.credits - credits)
        )
        if res.rowcount == 1:  # type: ignore[attr-defined]
            s.add(LedgerEntry(key_id=key_id, delta=-credits, kind="hold", request_id=request_id))
            return
        row = s.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        raise Unauthorized("missing, malformed, unknown or revoked API key")
    raise InsufficientCredits(
        f"this call costs {credits} credits and the key has {row.credits}; top up and retry",
        headers={
            "X-Credits-Required": str(credits),
            "X-Credits-Remaining": str(row.credits),
        },
    )


def release(db: Database, *, key_id: int, credits: int, request_id: str) -> None:
    """Give back a reservation whose call failed."""
    with db.transaction() as s:
        s.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(credits=ApiKey.credits + credits)
        )
        s.add(LedgerEntry(key_id=key_id, delta=credits, kind="release", request_id=request_id))


def capture(db: Database, *, key_id: int, credits: int, request_id: str, usage: UsageRecord) -> int:
    """Record the successful call against its reservation; return the credits remaining."""
    with db.transaction() as s:
        s.add(
            UsageEvent(
                key_id=key_id,
                request_id=request_id,
                operation=usage.operation,
                model=usage.model,
                input_width=usage.input_size[0],
                input_height=usage.input_size[1],
                output_width=usage.output_size[0],
                output_height=usage.output_size[1],
                credits=credits,
                duration_ms=usage.duration_ms,
            )
        )
        remaining = s.scalar(select(ApiKey.credits).where(ApiKey.id == key_id))
        return int(remaining or 0)


def list_usage(
    db: Database,
    *,
    key_id: int | None,
    since: datetime | None = None,
    until: datetime | None = None,
    operation: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[UsageRow]:
    """Usage rows, newest first; `key_id=None` lists every key's (admin/CLI)."""
    q = select(UsageEvent)
    if key_id is not None:
        q = q.where(UsageEvent.key_id == key_id)
    if since is not None:
        q = q.where(UsageEvent.created_at >= since)
    if until is not None:
        q = q.where(UsageEvent.created_at < until)
    if operation is not None:
        q = q.where(UsageEvent.operation == operation)
    q = q.order_by(UsageEvent.created_at.desc(), UsageEvent.id.desc()).limit(limit).offset(offset)
    with db.transaction() as s:
        return [
            UsageRow(
                e.request_id,
                e.operation,
                e.model,
                e.input_width,
                e.input_height,
                e.output_width,
                e.output_height,
                e.credits,
                e.duration_ms,
                e.created_at,
            )
            for e in s.scalars(q)
        ]


def ledger_mismatches(db: Database) -> list[tuple[int, int, int]]:
    """(key id, balance, sum of ledger) for every key whose balance disagrees with its ledger."""
    sums = (
        select(
            LedgerEntry.key_id,
            func.coalesce(func.sum(LedgerEntry.delta), 0).label("total"),
        )
        .group_by(LedgerEntry.key_id)
        .subquery()
    )
    q = select(ApiKey.id, ApiKey.credits, func.coalesce(sums.c.total, 0)).outerjoin(
        sums, sums.c.key_id == ApiKey.id
    )
    with db.transaction() as s:
        return [(i, c, int(t)) for i, c, t in s.execute(q) if c != int(t)]


def usage_csv(rows: list[UsageRow]) -> str:
    """Usage rows as CSV with a header line (for invoices and spreadsheets)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(UsageRow)])
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))
    return buf.getvalue()
