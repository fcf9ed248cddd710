"""The caller's account: balance, usage (JSON or CSV), summaries and monthly statements."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Query, Response
from pydantic import AfterValidator, BaseModel, BeforeValidator
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import usage as usage_store
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.limits import MAX_ID, MAX_ROWS
from imgsvc.billing.usage import GroupBy, UsageFilter
from imgsvc.models.registry import Operation
from imgsvc.routes.deps import ApiKeyDep, DatabaseDep, FreshApiKeyDep

router = APIRouter(prefix="/v1", tags=["account"])
CSV_RESPONSES: dict[int | str, dict[str, object]] = {200: {"content": {"text/csv": {}}}}


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The database keeps UTC timestamps without a zone; the API writes them as RFC 3339 (…Z).
UtcDateTime = Annotated[datetime, AfterValidator(_utc)]
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def _iso_only(value: object) -> object:
    """A date-time given as text must be ISO 8601 (`2026-11-02` or `2026-11-02T10:00:00Z`):
    a bare number is not taken for Unix seconds."""
    if isinstance(value, int | float) or (isinstance(value, str) and not _ISO_DATE.match(value)):
        raise ValueError("must be an ISO 8601 date or date-time, e.g. 2026-11-02T10:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_only)]
STATEMENT_MAX_ROWS = 1_000_000
MONTH_PATTERN = r"^(2\d{3}|[3-8]\d{3}|9[0-8]\d{2}|99[0-8]\d)-(0[1-9]|1[0-2])$"  # 2000-01..9998-12


class AccountPublic(BaseModel):
    id: int
    name: str
    key_prefix: str
    credits: int
    scopes: list[str]
    rate_limit: str | None
    monthly_cap: int | None
    month_spent: int
    expires_at: UtcDateTime | None
    created_at: UtcDateTime


class UsagePublic(BaseModel):
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
    created_at: UtcDateTime


class UsagePage(BaseModel):
    data: list[UsagePublic]
    limit: int
    offset: int
    next_offset: int | None


class UsageGroupPublic(BaseModel):
    group: str
    calls: int
    credits: int


class UsageSummary(BaseModel):
    group_by: str
    data: list[UsageGroupPublic]
    total_calls: int
    total_credits: int


def account_public(key: KeyInfo) -> AccountPublic:
    return AccountPublic(
        id=key.id,
        name=key.name,
        key_prefix=key.prefix,
        credits=key.credits,
        scopes=list(key.scopes),
        rate_limit=key.rate_limit,
        monthly_cap=key.monthly_cap,
        month_spent=key.month_spent,
        expires_at=key.expires_at,
        created_at=key.created_at,
    )


def naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def visible_usage(key: KeyInfo, where: UsageFilter) -> UsageFilter:
    """A top-level key sees its whole account (its sub-keys included); a sub-key only itself."""
    if key.parent_key_id is None:
        return replace(where, account_id=key.account_id)
    return replace(where, account_id=key.account_id, key_id=key.id)


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int
    csv: bool


async def _usage_filter(
    since: Annotated[IsoDateTime | None, Query(description="ISO 8601, inclusive, UTC")] = None,
    until: Annotated[IsoDateTime | None, Query(description="ISO 8601, exclusive, UTC")] = None,
    operation: Operation | None = None,
    client_ref: Annotated[str | None, Query(description="the X-Client-Ref of the calls")] = None,
    key_id: Annotated[
        int | None, Query(ge=1, le=MAX_ID, description="one key (e.g. a sub-key)")
    ] = None,
) -> UsageFilter:
    return UsageFilter(
        key_id=key_id,
        since=naive_utc(since),
        until=naive_utc(until),
        operation=operation,
        client_ref=client_ref,
    )


OffsetQuery = Annotated[int, Query(ge=0, le=MAX_ROWS)]
FormatQuery = Annotated[str | None, Query(pattern="^(json|csv)$")]
AcceptHeader = Annotated[str | None, Header(include_in_schema=False)]


def _wants_csv(format: str | None, accept: str | None) -> bool:
    return format == "csv" or (format is None and accept is not None and "text/csv" in accept)


async def _page(
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
    offset: OffsetQuery = 0,
    format: FormatQuery = None,
    accept: AcceptHeader = None,
) -> Page:
    return Page(limit, offset, _wants_csv(format, accept))


async def _statement_page(
    limit: Annotated[
        int | None,
        Query(ge=1, le=STATEMENT_MAX_ROWS, description="CSV rows (default: the whole month)"),
    ] = None,
    offset: OffsetQuery = 0,
    format: FormatQuery = None,
    accept: AcceptHeader = None,
) -> Page:
    return Page(limit or STATEMENT_MAX_ROWS, offset, _wants_csv(format, accept))


UsageFilterDep = Annotated[UsageFilter, Depends(_usage_filter)]
PageDep = Annotated[Page, Depends(_page)]
StatementPageDep = Annotated[Page, Depends(_statement_page)]


async def usage_response(db: Database, where: UsageFilter, page: Page) -> UsagePage | Response:
    """A page of usage rows as JSON, or as CSV (Accept: text/csv or format=csv)."""
    rows = await run_in_threadpool(
        lambda: usage_store.list_usage(db, where, limit=page.limit, offset=page.offset)
    )
    if page.csv:
        return Response(usage_store.usage_csv(rows), media_type="text/csv")
    return UsagePage(
        data=[UsagePublic(**asdict(r)) for r in rows],
        limit=page.limit,
        offset=page.offset,
        next_offset=page.offset + page.limit if len(rows) == page.limit else None,
    )


async def summary_response(db: Database, where: UsageFilter, group_by: GroupBy) -> UsageSummary:
    groups = await run_in_threadpool(lambda: usage_store.summarize(db, where, group_by))
    return UsageSummary(
        group_by=group_by,
        data=[UsageGroupPublic(**asdict(g)) for g in groups],
        total_calls=sum(g.calls for g in groups),
        total_credits=sum(g.credits for g in groups),
    )


@router.get("/account", summary="The calling key, its account's credits and its limits")
async def account(key: FreshApiKeyDep) -> AccountPublic:
    return account_public(key)


@router.get(
    "/usage",
    summary="Usage events, newest first (CSV with Accept: text/csv or format=csv)",
    response_model=UsagePage,
    responses=CSV_RESPONSES,
)
async def usage(
    key: ApiKeyDep, db: DatabaseDep, where: UsageFilterDep, page: PageDep
) -> UsagePage | Response:
    return await usage_response(db, visible_usage(key, where), page)


@router.get("/usage/summary", summary="Calls and credits grouped by day, operation or client")
async def usage_summary(
    key: ApiKeyDep, db: DatabaseDep, where: UsageFilterDep, group_by: GroupBy = "day"
) -> UsageSummary:
    return await summary_response(db, visible_usage(key, where), group_by)


@router.get(
    "/statements/{month}",
    summary="Monthly statement (YYYY-MM, UTC): every charged call, by operation and client",
    response_model=UsageSummary,
    responses=CSV_RESPONSES,
)
async def statement(
    month: Annotated[str, Path(pattern=MONTH_PATTERN, description="YYYY-MM, 2000-01 to 9998-12")],
    key: ApiKeyDep,
    db: DatabaseDep,
    page: StatementPageDep,
) -> UsageSummary | Response:
    start, end = usage_store.month_bounds(month)
    where = visible_usage(key, UsageFilter(since=start, until=end))
    if page.csv:
        rows = await run_in_threadpool(
            lambda: usage_store.list_usage(db, where, limit=page.limit, offset=page.offset)
        )
        return Response(
            usage_store.usage_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="imgsvc-{month}.csv"'},
        )
    return await summary_response(db, where, "operation")
