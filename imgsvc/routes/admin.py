"""Operator API under /v1/admin, guarded by IMGSVC_ADMIN_TOKEN (disabled when unset)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import keys
from imgsvc.billing.keys import Scope
from imgsvc.billing.limits import MAX_CREDITS, MAX_GRACE_SECONDS
from imgsvc.billing.usage import GroupBy
from imgsvc.routes.account import (
    CSV_RESPONSES,
    AccountPublic,
    IsoDateTime,
    PageDep,
    UsageFilterDep,
    UsagePage,
    UsageSummary,
    UtcDateTime,
    account_public,
    naive_utc,
    summary_response,
    usage_response,
)
from imgsvc.routes.deps import AdminDep, DatabaseDep, JsonInt, KeyIdPath
from imgsvc.routes.keys import KeyCreated
from imgsvc.routes.openapi import errors

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])


# What the rate-limit parser takes: `60/minute`, `10 per second`, `100/2 hours`.
RATE_LIMIT_PATTERN = r"^[1-9][0-9]{0,8} ?(/|per) ?([1-9][0-9]{0,5} )?(second|minute|hour|day)s?$"


class AdminKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    credits: JsonInt = Field(0, ge=0, le=MAX_CREDITS)
    scopes: list[Scope] | None = Field(None, min_length=1, description="default: every operation")
    rate_limit: str | None = Field(
        None, pattern=RATE_LIMIT_PATTERN, description="e.g. 60/minute; default: the plan's"
    )
    expires_at: IsoDateTime | None = None


class AdminKeyPublic(AccountPublic):
    account_id: int
    parent_key_id: int | None
    revoked_at: UtcDateTime | None


class Rotate(BaseModel):
    old_valid_for_seconds: JsonInt = Field(
        86_400, ge=0, le=MAX_GRACE_SECONDS, description="grace period of the old key"
    )


class TopUp(BaseModel):
    credits: JsonInt = Field(gt=0, le=MAX_CREDITS)


def _admin_public(info: keys.KeyInfo) -> AdminKeyPublic:
    return AdminKeyPublic(
        **account_public(info).model_dump(),
        account_id=info.account_id,
        parent_key_id=info.parent_key_id,
        revoked_at=info.revoked_at,
    )


@router.post("/keys", status_code=201, summary="Create an account with its first key")
async def create_key(body: AdminKeyCreate, db: DatabaseDep) -> KeyCreated:
    info, secret = await run_in_threadpool(
        lambda: keys.create_key(
            db,
            name=body.name,
            credits=body.credits,
            scopes=body.scopes,
            rate_limit=body.rate_limit,
            expires_at=naive_utc(body.expires_at),
        )
    )
    return KeyCreated(key=secret, info=account_public(info))


@router.get("/keys", summary="Every key")
async def list_keys(db: DatabaseDep) -> list[AdminKeyPublic]:
    return [_admin_public(k) for k in await run_in_threadpool(keys.list_keys, db)]


@router.post("/keys/{key_id}/revoke", summary="Revoke a key at once")
async def revoke(key_id: KeyIdPath, db: DatabaseDep) -> AdminKeyPublic:
    return _admin_public(await run_in_threadpool(keys.revoke_key, db, key_id))


@router.post("/keys/{key_id}/rotate", status_code=201, summary="New secret; old one expires")
async def rotate(key_id: KeyIdPath, body: Rotate, db: DatabaseDep) -> KeyCreated:
    grace = timedelta(seconds=body.old_valid_for_seconds)
    info, secret = await run_in_threadpool(lambda: keys.rotate_key(db, key_id, old_valid_for=grace))
    return KeyCreated(key=secret, info=account_public(info))


@router.post(
    "/keys/{key_id}/topup",
    summary="Add credits to the key's account (409 past the balance maximum)",
    responses=errors(404, 409),
)
async def topup(key_id: KeyIdPath, body: TopUp, db: DatabaseDep) -> AdminKeyPublic:
    return _admin_public(await run_in_threadpool(keys.topup, db, key_id, body.credits))


@router.get(
    "/usage", summary="Usage across all keys", response_model=UsagePage, responses=CSV_RESPONSES
)
async def usage(db: DatabaseDep, where: UsageFilterDep, page: PageDep) -> UsagePage | Response:
    return await usage_response(db, where, page)


@router.get("/usage/summary", summary="Calls and credits across keys, grouped")
async def usage_summary(
    db: DatabaseDep, where: UsageFilterDep, group_by: GroupBy = "key"
) -> UsageSummary:
    return await summary_response(db, where, group_by)
