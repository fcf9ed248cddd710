"""Reading usage: filtered pages, summaries, monthly statements, CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Select, String, cast, func, select

from imgsvc.billing.db import Database
from imgsvc.billing.schema import UsageEvent
from imgsvc.errors import InvalidInput

GroupBy = Literal["day", "operation", "client_ref", "key"]


@dataclass(frozen=True)
class UsageFilter:
    """Which usage rows: by account (a customer, a reseller with its sub-keys), by key, or all."""

    account_id: int | None = None
    key_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    operation: str | None = None
    client_ref: str | None = None

    def apply(self, q: Select[Any]) -> Select[Any]:
        if self.account_id is not None:
            q = q.where(UsageEvent.account_id == self.account_id)
        if self.key_id is not None:
            q = q.where(UsageEvent.key_id == self.key_id)
        if self.since is not None:
            q = q.where(UsageEvent.created_at >= self.since)
        if self.until is not None:
            q = q.where(UsageEvent.created_at < self.until)
        if self.operation is not None:
            q = q.where(UsageEvent.operation == self.operation)
        if self.client_ref is not None:
            q = q.where(UsageEvent.client_ref == self.client_ref)
        return q


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    key_id: int
    operation: str
    model: str
    client_ref: str | None
    input_width: int
    input_height: int
    output_width: int
    output_height: int
    credits: int
    price_version: str
    duration_ms: int
    created_at: datetime


@dataclass(frozen=True)
class UsageGroup:
    group: str
    calls: int
    credits: int


def list_usage(
    db: Database, where: UsageFilter, *, limit: int = 100, offset: int = 0
) -> list[UsageRow]:
    """Usage rows, newest first."""
    q = where.apply(select(UsageEvent))
    q = q.order_by(UsageEvent.created_at.desc(), UsageEvent.id.desc()).limit(limit).offset(offset)
    with db.read() as s:
        return [
            UsageRow(**{f.name: getattr(e, f.name) for f in fields(UsageRow)}) for e in s.scalars(q)
        ]


def summarize(db: Database, where: UsageFilter, group_by: GroupBy) -> list[UsageGroup]:
    """Calls and credits per day (UTC), operation, client reference or key."""
    column: Any
    if group_by == "day":
        column = func.substr(cast(UsageEvent.created_at, String), 1, 10)
    elif group_by == "operation":
        column = UsageEvent.operation
    elif group_by == "client_ref":
        column = func.coalesce(UsageEvent.client_ref, "")
    elif group_by == "key":
        column = cast(UsageEvent.key_id, String)
    else:  # pragma: no cover - guarded by the Literal type at the edges
        raise InvalidInput(f"cannot group by {group_by!r}")
    q = where.apply(
        select(column.label("g"), func.count(), func.coalesce(func.sum(UsageEvent.credits), 0))
    )
    q = q.group_by(column).order_by(column)
    with db.read() as s:
        return [UsageGroup(str(g), int(n), int(c)) for g, n, c in s.execute(q)]


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """'2026-11' → [2026-11-01, 2026-12-01)."""
    try:
        start = datetime.strptime(month, "%Y-%m")
    except ValueError:
        raise InvalidInput(f"month must look like 2026-11, got {month!r}") from None
    if not 2000 <= start.year <= 9998:
        raise InvalidInput(f"month must be from 2000-01 to 9998-12, got {month!r}")
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def rows_csv(rows: list[Any]) -> str:
    """Dataclass rows as CSV with a header line (for invoices and spreadsheets)."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(rows[0])])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in asdict(row).items()})
    return buf.getvalue()


def _csv_value(value: Any) -> Any:
    """Timestamps as RFC 3339 in UTC (the database keeps them naive, in UTC)."""
    if isinstance(value, datetime):
        return utc_rfc3339(value)
    return value


def utc_rfc3339(value: datetime) -> str:
    """A UTC timestamp (naive ones are UTC) as `2026-11-02T10:00:00.123456Z`."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat() + "Z"


def usage_csv(rows: list[UsageRow]) -> str:
    if not rows:
        return ",".join(f.name for f in fields(UsageRow)) + "\r\n"
    return rows_csv(rows)
