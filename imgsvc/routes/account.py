"""The caller's account: balance, usage (JSON or CSV), summaries and monthly statements."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import usage as usage_store
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.usage import GroupBy, UsageFilter
from imgsvc.models.registry import Operation
from imgsvc.routes.deps import ApiKeyDep, DatabaseDep, FreshApiKeyDep

router = APIRouter(prefix="/v1", tags=["account"])
CSV_RESPONSES: dict[int | str, dict[str, object]] = {200: {"content": {"text/csv": {}}}}


class AccountPublic(BaseModel):
    id: int
    name: str
    key_prefix: str
    credits: int
    scopes: list[str]
    rate_limit: str | None
    monthly_cap: int | None
    month_spent: int
    expires_at: datetime | None
    created_at: datetime


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
    created_at: datetime


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
    since: Annotated[datetime | None, Query(description="ISO 8601, inclusive, UTC")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive, UTC")] = None,
    operation: Operation | None = None,
    client_ref: Annotated[str | None, Query(description="the X-Client-Ref of the calls")] = None,
    key_id: Annotated[int | None, Query(description="one key (e.g. a sub-key)")] = None,
) -> UsageFilter:
    return UsageFilter(
        key_id=key_id,
        since=naive_utc(since),
        until=naive_utc(until),
        operation=operation,
        client_ref=client_ref,
    )


async def _page(
    limit: Annotated[int, Query(ge=1, le=100_000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Page:
    csv = format == "csv" or (format is None and accept is not None and "text/csv" in accept)
    return Page(limit, offset, csv)


UsageFilterDep = Annotated[UsageFilter, Depends(_usage_filter)]
PageDep = Annotated[Page, Depends(_page)]


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
    month: str, key: ApiKeyDep, db: DatabaseDep, page: PageDep
) -> UsageSummary | Response:
    start, end = usage_store.month_bounds(month)
    where = visible_usage(key, UsageFilter(since=start, until=end))
    if page.csv:
        rows = await run_in_threadpool(lambda: usage_store.list_usage(db, where, limit=1_000_000))
        return Response(
            usage_store.usage_csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="imgsvc-{month}.csv"'},
        )
    return await summary_response(db, where, "operation")
