"""GET /v1/account and GET /v1/usage — the caller's balance and usage events."""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import metering
from imgsvc.models.registry import Operation
from imgsvc.routes.deps import ApiKeyDep, DatabaseDep

router = APIRouter(prefix="/v1", tags=["account"])


class AccountPublic(BaseModel):
    id: int
    name: str
    key_prefix: str
    credits: int
    created_at: datetime


class UsagePublic(BaseModel):
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


class UsagePage(BaseModel):
    data: list[UsagePublic]
    limit: int
    offset: int


@router.get("/account", summary="The calling key and its remaining credits")
async def account(key: ApiKeyDep) -> AccountPublic:
    return AccountPublic(
        id=key.id,
        name=key.name,
        key_prefix=key.prefix,
        credits=key.credits,
        created_at=key.created_at,
    )


@router.get(
    "/usage",
    summary="The calling key's usage events, newest first (CSV with Accept: text/csv)",
    response_model=UsagePage,
    responses={200: {"content": {"text/csv": {}}}},
)
async def usage(
    key: ApiKeyDep,
    db: DatabaseDep,
    since: Annotated[datetime | None, Query(description="ISO 8601, inclusive, UTC")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive, UTC")] = None,
    operation: Operation | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    accept: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> UsagePage | Response:
    rows = await run_in_threadpool(
        lambda: metering.list_usage(
            db,
            key_id=key.id,
            since=_naive_utc(since),
            until=_naive_utc(until),
            operation=operation,
            limit=limit,
            offset=offset,
        )
    )
    if accept and "text/csv" in accept:
        return Response(metering.usage_csv(rows), media_type="text/csv")
    return UsagePage(data=[UsagePublic(**asdict(r)) for r in rows], limit=limit, offset=offset)


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)
