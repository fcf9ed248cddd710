"""API keys: `isk_<random>_<crc32>`, shown once, stored as SHA-256, compared in constant time.

A key acts for an account (whose balance it spends), may carry scopes (which operations), an
expiry, a rate limit, and — for a reseller's sub-key — a monthly credit cap.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased

from imgsvc.billing.db import Database
from imgsvc.billing.limits import MAX_CREDITS
from imgsvc.billing.schema import Account, ApiKey, LedgerEntry, utcnow
from imgsvc.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized

PREFIX = "isk_"
OPERATION_SCOPES = ("remove-background", "upscale", "inpaint")
RESELLER_SCOPE = "keys:children"
ALL_SCOPES = (*OPERATION_SCOPES, RESELLER_SCOPE)
OperationScope = Literal["remove-background", "upscale", "inpaint"]
Scope = Literal["remove-background", "upscale", "inpaint", "keys:children"]
_ALPHABET = string.ascii_letters + string.digits
_RANDOM_LEN = 32
_CHECK_LEN = 6
_DENIED = "missing, malformed, unknown, expired or revoked API key"


@dataclass(frozen=True)
class KeyInfo:
    """What the service may know about a key (never the secret)."""

    id: int
    account_id: int
    name: str
    prefix: str
    credits: int  # the account's balance
    scopes: tuple[str, ...]
    rate_limit: str | None
    parent_key_id: int | None
    monthly_cap: int | None
    month_spent: int
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime

    def may(self, scope: str) -> bool:
        return scope in self.scopes


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), _CHECK_LEN)


def generate_secret() -> str:
    body = PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LEN))
    return f"{body}_{_checksum(body)}"


def is_well_formed(secret: str) -> bool:
    """Format and checksum check; rejects typos and garbage without touching the database."""
    body, sep, check = secret.rpartition("_")
    if not sep or not body.startswith(PREFIX) or len(body) != len(PREFIX) + _RANDOM_LEN:
        return False
    if len(check) != _CHECK_LEN or not all(c in _ALPHABET for c in body[len(PREFIX) :]):
        return False
    return hmac.compare_digest(check, _checksum(body))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def current_month(now: datetime | None = None) -> str:
    return (now or utcnow()).strftime("%Y-%m")


def parse_scopes(scopes: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validate scopes; None means every operation (not the reseller scope)."""
    if scopes is None:
        return OPERATION_SCOPES
    items = scopes.replace(",", " ").split() if isinstance(scopes, str) else list(scopes)
    unknown = sorted(set(items) - set(ALL_SCOPES))
    if unknown or not items:
        raise InvalidInput(f"scopes must be a non-empty subset of {list(ALL_SCOPES)}")
    return tuple(s for s in ALL_SCOPES if s in items)


def _info(row: ApiKey, credits: int) -> KeyInfo:
    spent = row.month_spent if row.cap_month == current_month() else 0
    return KeyInfo(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        prefix=row.key_prefix,
        credits=credits,
        scopes=tuple(row.scopes.split()),
        rate_limit=row.rate_limit,
        parent_key_id=row.parent_key_id,
        monthly_cap=row.monthly_cap,
        month_spent=spent,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        created_at=row.created_at,
    )


def _validate_rate_limit(rate_limit: str | None) -> None:
    if rate_limit is None:
        return
    from limits import parse

    try:
        parse(rate_limit)
    except ValueError:
        raise InvalidInput(
            f"rate limit {rate_limit!r} is not valid; use e.g. '60/minute' or '10/second'"
        ) from None


def _new_key_row(
    s: Session,
    *,
    account_id: int,
    name: str,
    scopes: tuple[str, ...],
    rate_limit: str | None,
    expires_at: datetime | None,
    parent_key_id: int | None = None,
    monthly_cap: int | None = None,
) -> tuple[ApiKey, str]:
    secret = generate_secret()
    row = ApiKey(
        account_id=account_id,
        parent_key_id=parent_key_id,
        name=name,
        key_hash=hash_secret(secret),
        key_prefix=secret[:10],
        scopes=" ".join(scopes),
        rate_limit=rate_limit,
        monthly_cap=monthly_cap,
        month_spent=0,
        expires_at=expires_at,
    )
    s.add(row)
    s.flush()
    return row, secret


def create_key(
    db: Database,
    *,
    name: str,
    credits: int,
    scopes: str | Sequence[str] | None = None,
    rate_limit: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[KeyInfo, str]:
    """A new account with an initial grant and its first key; returns the secret once."""
    if not 0 <= credits <= MAX_CREDITS:
        raise InvalidInput(f"credits must be 0 to {MAX_CREDITS}")
    scope_tuple = parse_scopes(scopes)
    _validate_rate_limit(rate_limit)
    with db.transaction() as s:
        account = Account(name=name, credits=credits)
        s.add(account)
        s.flush()
        row, secret = _new_key_row(
            s,
            account_id=account.id,
            name=name,
            scopes=scope_tuple,
            rate_limit=rate_limit,
            expires_at=expires_at,
        )
        s.add(LedgerEntry(account_id=account.id, key_id=row.id, delta=credits, kind="grant"))
        return _info(row, credits), secret


def create_child_key(
    db: Database,
    parent: KeyInfo,
    *,
    name: str,
    monthly_cap: int | None,
    scopes: str | Sequence[str] | None = None,
) -> tuple[KeyInfo, str]:
    """A reseller's sub-key: spends the parent's account, capped per calendar month (UTC)."""
    if not parent.may(RESELLER_SCOPE):
        raise Forbidden(f"this key lacks the {RESELLER_SCOPE!r} scope")
    if monthly_cap is not None and not 0 <= monthly_cap <= MAX_CREDITS:
        raise InvalidInput(f"monthly_cap must be 0 to {MAX_CREDITS}")
    wanted = parse_scopes(scopes)
    allowed = tuple(s for s in wanted if s in parent.scopes and s != RESELLER_SCOPE)
    if not allowed:
        raise InvalidInput("a sub-key needs at least one operation scope its parent has")
    with db.transaction() as s:
        row, secret = _new_key_row(
            s,
            account_id=parent.account_id,
            name=name,
            scopes=allowed,
            rate_limit=parent.rate_limit,
            expires_at=None,
            parent_key_id=parent.id,
            monthly_cap=monthly_cap,
        )
        return _info(row, _balance(s, parent.account_id)), secret


def _balance(s: Session, account_id: int) -> int:
    return int(s.scalar(select(Account.credits).where(Account.id == account_id)) or 0)


def authenticate(db: Database, secret: str) -> KeyInfo:
    """The live key for `secret`, or Unauthorized (one message for every cause)."""
    if not is_well_formed(secret):
        raise Unauthorized(_DENIED)
    digest = hash_secret(secret)
    parent = aliased(ApiKey)
    now = utcnow()
    with db.read() as s:
        found = s.execute(
            select(ApiKey, Account.credits, parent.revoked_at)
            .join(Account, Account.id == ApiKey.account_id)
            .outerjoin(parent, parent.id == ApiKey.parent_key_id)
            .where(ApiKey.key_hash == digest)
        ).one_or_none()
    if found is None:
        raise Unauthorized(_DENIED)
    row, credits, parent_revoked = found
    if not hmac.compare_digest(row.key_hash, digest):
        raise Unauthorized(_DENIED)
    if row.revoked_at is not None or parent_revoked is not None:
        raise Unauthorized(_DENIED)
    if row.expires_at is not None and row.expires_at <= now:
        raise Unauthorized(_DENIED)
    return _info(row, int(credits))


def get_key(db: Database, key_id: int) -> KeyInfo:
    with db.read() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no key with id {key_id}")
        return _info(row, _balance(s, row.account_id))


def list_keys(db: Database, *, parent_key_id: int | None = None) -> list[KeyInfo]:
    """Every key (admin), or a reseller's sub-keys."""
    q = select(ApiKey, Account.credits).join(Account, Account.id == ApiKey.account_id)
    if parent_key_id is not None:
        q = q.where(ApiKey.parent_key_id == parent_key_id)
    with db.read() as s:
        return [_info(r, int(c)) for r, c in s.execute(q.order_by(ApiKey.id))]


def count_keys(db: Database) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(ApiKey)) or 0)


def revoke_key(db: Database, key_id: int, *, parent_key_id: int | None = None) -> KeyInfo:
    """Revoke at once (checked on every request). `parent_key_id` limits it to one's children."""
    with db.transaction() as s:
        row = s.get(ApiKey, key_id)
        if row is None or (parent_key_id is not None and row.parent_key_id != parent_key_id):
            raise NotFound(f"no key with id {key_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        return _info(row, _balance(s, row.account_id))


def rotate_key(
    db: Database, key_id: int, *, old_valid_for: timedelta = timedelta(hours=24)
) -> tuple[KeyInfo, str]:
    """A new secret for the same account and settings; the old one works `old_valid_for` more."""
    if old_valid_for < timedelta(0):
        raise InvalidInput("the old key's grace period cannot be negative")
    with db.transaction() as s:
        old = s.get(ApiKey, key_id)
        if old is None or old.revoked_at is not None:
            raise NotFound(f"no active key with id {key_id}")
        row, secret = _new_key_row(
            s,
            account_id=old.account_id,
            name=old.name,
            scopes=tuple(old.scopes.split()),
            rate_limit=old.rate_limit,
            expires_at=old.expires_at,
            parent_key_id=old.parent_key_id,
            monthly_cap=old.monthly_cap,
        )
        deadline = utcnow() + old_valid_for
        if old.expires_at is None or old.expires_at > deadline:
            old.expires_at = deadline
        return _info(row, _balance(s, row.account_id)), secret


def topup(db: Database, key_id: int, credits: int) -> KeyInfo:
    """Add credits to the key's account (ledger row + balance in one transaction)."""
    if not 0 < credits <= MAX_CREDITS:
        raise InvalidInput(f"a top-up must be 1 to {MAX_CREDITS} credits")
    with db.transaction() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no key with id {key_id}")
        added = s.execute(
            update(Account)
            .where(Account.id == row.account_id, Account.credits <= MAX_CREDITS - credits)
            .values(credits=Account.credits + credits)
        )
        if added.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"the balance would pass the maximum of {MAX_CREDITS} credits")
        s.add(LedgerEntry(account_id=row.account_id, key_id=key_id, delta=credits, kind="topup"))
        return _info(row, _balance(s, row.account_id))


class KeyCache:
    """Authenticated keys remembered for `ttl` seconds, so a metered call needs no key query.

    A revocation or expiry takes effect within `ttl` on every replica (the API promises 5 s);
    balances are never taken from here: holds always update the database.
    """

    def __init__(self, db: Database, ttl: float, max_entries: int = 10_000) -> None:
        self._db = db
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[str, tuple[KeyInfo, float]] = {}
        self._lock = threading.Lock()

    def authenticate(self, secret: str) -> KeyInfo:
        if self._ttl <= 0:
            return authenticate(self._db, secret)
        if not is_well_formed(secret):
            raise Unauthorized(_DENIED)
        digest = hash_secret(secret)
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(digest)
        if hit is not None and now - hit[1] < self._ttl:
            info = hit[0]
            if info.expires_at is not None and info.expires_at <= utcnow():
                raise Unauthorized(_DENIED)
            return info
        info = authenticate(self._db, secret)
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[digest] = (info, now)
        return info
