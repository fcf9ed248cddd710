"""Annotated dependencies shared by the routers: settings, database, engines, the caller's key."""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from imgsvc.billing import keys
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.limits import MAX_ID
from imgsvc.config import Settings
from imgsvc.errors import NotFound, Unauthorized
from imgsvc.models.registry import Registry
from imgsvc.operations.context import Context


def _not_a_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    return value


# An integer in a JSON body: `true` is not taken for 1 (a whole `16823.0` still is an integer).
# Bounds go before it (`Annotated[int, Field(ge=0), NOT_A_BOOLEAN]`), or the schema loses them.
NOT_A_BOOLEAN = BeforeValidator(_not_a_boolean)
JsonInt = Annotated[int, NOT_A_BOOLEAN]


def new_request_id() -> str:
    """A request id the service makes (`req_` and 24 hex digits)."""
    return f"req_{secrets.token_hex(12)}"


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.context.registry
    return registry


def _context(request: Request) -> Context:
    context: Context = request.app.state.context
    return context


KeyIdPath = Annotated[int, Path(ge=1, le=MAX_ID, description="the key's id")]
SettingsDep = Annotated[Settings, Depends(_settings)]
DatabaseDep = Annotated[Database, Depends(_db)]
RegistryDep = Annotated[Registry, Depends(_registry)]
ContextDep = Annotated[Context, Depends(_context)]


def _key_cache(request: Request) -> keys.KeyCache:
    cache: keys.KeyCache = request.app.state.key_cache
    return cache


def api_secret(authorization: str | None, x_api_key: str | None) -> str:
    """The key sent as `Authorization: Bearer <key>` or `X-API-Key`; Unauthorized if none."""
    secret = x_api_key
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            secret = value.strip()
    if not secret:
        raise Unauthorized("send your key as `Authorization: Bearer <key>` or `X-API-Key: <key>`")
    return secret


AuthorizationHeader = Annotated[str | None, Header(description="`Bearer <key>`")]
ApiKeyHeader = Annotated[str | None, Header(description="the API key")]


async def _api_key(
    request: Request,
    cache: Annotated[keys.KeyCache, Depends(_key_cache)],
    authorization: AuthorizationHeader = None,
    x_api_key: ApiKeyHeader = None,
) -> KeyInfo:
    """The caller's key, re-checked against the database at most every few seconds."""
    key = await run_in_threadpool(cache.authenticate, api_secret(authorization, x_api_key))
    request.state.key = key  # its id goes into the request's log line
    return key


async def _fresh_api_key(
    request: Request,
    db: DatabaseDep,
    authorization: AuthorizationHeader = None,
    x_api_key: ApiKeyHeader = None,
) -> KeyInfo:
    """The caller's key read from the database now (live balance and status)."""
    key = await run_in_threadpool(keys.authenticate, db, api_secret(authorization, x_api_key))
    request.state.key = key
    return key


FreshApiKeyDep = Annotated[KeyInfo, Depends(_fresh_api_key)]
ApiKeyDep = Annotated[KeyInfo, Depends(_api_key)]


async def _admin(
    settings: SettingsDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <IMGSVC_ADMIN_TOKEN>`")
    ] = None,
) -> None:
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if not token:
        raise NotFound("the admin API is disabled (set IMGSVC_ADMIN_TOKEN to enable it)")
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
        raise Unauthorized("admin endpoints need `Authorization: Bearer <IMGSVC_ADMIN_TOKEN>`")


AdminDep = Depends(_admin)
