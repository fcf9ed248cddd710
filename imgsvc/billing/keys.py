"""API keys: `isk_<random>_<crc32>`, shown once, stored as SHA-256, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update

from imgsvc.billing.db import Database
from imgsvc.billing.schema import ApiKey, LedgerEntry, utcnow
from imgsvc.errors import InvalidInput, NotFound, Unauthorized

PREFIX = "isk_"
_ALPHABET = string.ascii_letters + string.digits
_RANDOM_LEN = 32
_CHECK_LEN = 6


@dataclass(frozen=True)
class KeyInfo:
    """What the service may know about a key (never the secret)."""

    id: int
    name: str
    prefix: str
    credits: int
    created_at: datetime
    revoked_at: datetime | None


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


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.key_prefix, row.credits, row.created_at, row.revoked_at)


def create_key(db: Database, *, name: str, credits: int) -> tuple[KeyInfo, str]:
    """Create a key with an initial grant; return its info and the secret (shown once)."""
    if credits < 0:
        raise InvalidInput("credits must be >= 0")
    secret = generate_secret()
    with db.transaction() as s:
        row = ApiKey(
            name=name,
            key_hash=hash_secret(secret),
            key_prefix=secret[:10],
            credits=credits,
        )
        s.add(row)
        s.flush()
        s.add(LedgerEntry(key_id=row.id, delta=credits, kind="grant"))
        return _info(row), secret


def authenticate(db: Database, secret: str) -> KeyInfo:
    """Return the live key for `secret` or raise Unauthorized (same message for every cause)."""
    denied = Unauthorized("missing, malformed, unknown or revoked API key")
    if not is_well_formed(secret):
        raise denied
    digest = hash_secret(secret)
    with db.transaction() as s:
        row = s.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            raise denied
        if row.revoked_at is not None:
            raise denied
        return _info(row)


def get_key(db: Database, key_id: int) -> KeyInfo:
    with db.transaction() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no key with id {key_id}")
        return _info(row)


def list_keys(db: Database) -> list[KeyInfo]:
    with db.transaction() as s:
        return [_info(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.id))]


def count_keys(db: Database) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(ApiKey)) or 0)


def revoke_key(db: Database, key_id: int) -> KeyInfo:
    with db.transaction() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no key with id {key_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        return _info(row)


def topup(db: Database, key_id: int, credits: int) -> KeyInfo:
    """Add credits (ledger row + balance in one transaction)."""
    if credits <= 0:
        raise InvalidInput("top-up must be a positive number of credits")
    with db.transaction() as s:
        res = s.execute(
            update(ApiKey).where(ApiKey.id == key_id).values(credits=ApiKey.credits + credits)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise NotFound(f"no key with id {key_id}")
        s.add(LedgerEntry(key_id=key_id, delta=credits, kind="topup"))
        row = s.get(ApiKey, key_id)
        assert row is not None
        s.refresh(row)
        return _info(row)
