"""Operator API under /v1/admin, guarded by IMGSVC_ADMIN_TOKEN (disabled when unset)."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import keys
from imgsvc.billing.usage import GroupBy
from imgsvc.routes.account import (
    CSV_RESPONSES,
    AccountPublic,
    PageDep,
    UsageFilterDep,
    UsagePage,
    UsageSummary,
    account_public,
    naive_utc,
    summary_response,
    usage_response,
)
from imgsvc.routes.deps import AdminDep, DatabaseDep
from imgsvc.routes.keys import KeyCreated

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep])


class AdminKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    credits: int = Field(0, ge=0)
    scopes: list[str] | None = Field(None, description="default: every operation")
    rate_limit: str | None = Field(None, description="e.g. 60/minute; default: the plan's")
    expires_at: datetime | None = None


class AdminKeyPublic(AccountPublic):
    account_id: int
    parent_key_id: int | None
    revoked_at: datetime | None


class Rotate(BaseModel):
    old_valid_for_seconds: int = Field(86_400, ge=0, description="grace period of the old key")


class TopUp(BaseModel):
    credits: int = Field(gt=0)


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
async def revoke(key_id: int, db: DatabaseDep) -> AdminKeyPublic:
    return _admin_public(await run_in_threadpool(keys.revoke_key, db, key_id))


@router.post("/keys/{key_id}/rotate", status_code=201, summary="New secret; old one expires")
async def rotate(key_id: int, body: Rotate, db: DatabaseDep) -> KeyCreated:
    grace = timedelta(seconds=body.old_valid_for_seconds)
    info, secret = await run_in_threadpool(lambda: keys.rotate_key(db, key_id, old_valid_for=grace))
    return KeyCreated(key=secret, info=account_public(info))


@router.post("/keys/{key_id}/topup", summary="Add credits to the key's account")
async def topup(key_id: int, body: TopUp, db: DatabaseDep) -> AdminKeyPublic:
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
