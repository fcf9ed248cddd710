"""Reseller sub-keys: a key with the `keys:children` scope creates child keys that spend its
account's credits, each with its own monthly cap, for invoicing the reseller's own clients."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import keys
from imgsvc.billing.keys import RESELLER_SCOPE, KeyInfo, OperationScope
from imgsvc.billing.limits import MAX_CREDITS
from imgsvc.billing.usage import UsageFilter
from imgsvc.errors import Forbidden, NotFound
from imgsvc.routes.account import (
    CSV_RESPONSES,
    AccountPublic,
    PageDep,
    UsagePage,
    account_public,
    usage_response,
)
from imgsvc.routes.deps import NOT_A_BOOLEAN, ApiKeyDep, DatabaseDep, KeyIdPath
from imgsvc.routes.openapi import errors

router = APIRouter(prefix="/v1/keys", tags=["sub-keys"])


class ChildKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200, description="e.g. your client's name")
    monthly_cap: Annotated[int, Field(ge=0, le=MAX_CREDITS), NOT_A_BOOLEAN] | None = Field(
        None, description="credits per calendar month (UTC)"
    )
    scopes: list[OperationScope] | None = Field(
        None, min_length=1, description="operations; default: all of yours"
    )


class KeyCreated(BaseModel):
    key: str = Field(description="the secret, shown only this once")
    info: AccountPublic


def _reseller(key: KeyInfo) -> KeyInfo:
    if not key.may(RESELLER_SCOPE):
        raise Forbidden(f"this key lacks the {RESELLER_SCOPE!r} scope")
    return key


@router.post("", status_code=201, summary="Create a sub-key (shown once)", responses=errors(403))
async def create_child(body: ChildKeyCreate, key: ApiKeyDep, db: DatabaseDep) -> KeyCreated:
    parent = _reseller(key)
    info, secret = await run_in_threadpool(
        lambda: keys.create_child_key(
            db, parent, name=body.name, monthly_cap=body.monthly_cap, scopes=body.scopes
        )
    )
    return KeyCreated(key=secret, info=account_public(info))


@router.get("", summary="Your sub-keys with what each spent this month", responses=errors(403))
async def list_children(key: ApiKeyDep, db: DatabaseDep) -> list[AccountPublic]:
    parent = _reseller(key)
    children = await run_in_threadpool(lambda: keys.list_keys(db, parent_key_id=parent.id))
    return [account_public(c) for c in children if c.revoked_at is None]


@router.delete("/{key_id}", summary="Revoke a sub-key at once", responses=errors(403, 404))
async def revoke_child(key_id: KeyIdPath, key: ApiKeyDep, db: DatabaseDep) -> AccountPublic:
    parent = _reseller(key)
    info = await run_in_threadpool(lambda: keys.revoke_key(db, key_id, parent_key_id=parent.id))
    return account_public(info)


@router.get(
    "/{key_id}/usage",
    summary="One sub-key's usage (CSV with Accept: text/csv or format=csv)",
    response_model=UsagePage,
    responses={**CSV_RESPONSES, **errors(403, 404)},
)
async def child_usage(
    key_id: KeyIdPath, key: ApiKeyDep, db: DatabaseDep, page: PageDep
) -> UsagePage | Response:
    parent = _reseller(key)
    children = await run_in_threadpool(lambda: keys.list_keys(db, parent_key_id=parent.id))
    if key_id not in {c.id for c in children}:
        raise NotFound(f"no sub-key with id {key_id}")
    return await usage_response(db, UsageFilter(account_id=parent.account_id, key_id=key_id), page)
