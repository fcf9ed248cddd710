"""Idempotency-Key: the first response for (key, Idempotency-Key) is stored for 24 hours and
replayed to retries, so a retry never runs (or charges) twice."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from imgsvc.billing.db import Database
from imgsvc.billing.schema import IdempotencyRecord, utcnow
from imgsvc.errors import Conflict, InvalidInput

RETENTION = timedelta(hours=24)
MAX_KEY_LENGTH = 255


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    media_type: str


def begin(db: Database, *, key_id: int, idem_key: str, fingerprint: str) -> StoredResponse | None:
    """Claim (key, idem_key) for this request: None = go ahead and run it; a StoredResponse =
    replay it; raises 409 while the first call is still running, 422 for a different request."""
    if not idem_key or len(idem_key) > MAX_KEY_LENGTH:
        raise InvalidInput(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters")
    now = utcnow()
    try:
        with db.transaction() as s:
            s.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.key_id == key_id,
                    IdempotencyRecord.idem_key == idem_key,
                    IdempotencyRecord.expires_at < now,
                )
            )
            s.add(
                IdempotencyRecord(
                    key_id=key_id,
                    idem_key=idem_key,
                    fingerprint=fingerprint,
                    status="running",
                    expires_at=now + RETENTION,
                )
            )
        return None
    except IntegrityError:
        pass  # someone holds this key already: see what they did
    with db.transaction() as s:
        record = s.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.key_id == key_id, IdempotencyRecord.idem_key == idem_key
            )
        ).one_or_none()
    if record is None:  # finished and aborted between our two statements: let the client retry
        raise IdempotencyInProgress("a request with this Idempotency-Key just ended; retry")
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different request; use a new key"
        )
    if record.status != "done" or record.response_body is None:
        raise IdempotencyInProgress(
            "a request with this Idempotency-Key is still running; retry later",
            retry_after_s=1,
        )
    return StoredResponse(
        status=int(record.response_status or 200),
        headers=json.loads(record.response_headers or "{}"),
        body=record.response_body,
        media_type=record.media_type or "application/octet-stream",
    )


def complete(db: Database, *, key_id: int, idem_key: str, response: StoredResponse) -> None:
    with db.transaction() as s:
        s.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key_id == key_id, IdempotencyRecord.idem_key == idem_key)
            .values(
                status="done",
                response_status=response.status,
                response_headers=json.dumps(response.headers),
                response_body=response.body,
                media_type=response.media_type,
            )
        )


def abort(db: Database, *, key_id: int, idem_key: str) -> None:
    """Forget a claim whose call failed, so the client may retry it."""
    with db.transaction() as s:
        s.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.key_id == key_id,
                IdempotencyRecord.idem_key == idem_key,
                IdempotencyRecord.status == "running",
            )
        )


def purge_expired(db: Database) -> int:
    with db.transaction() as s:
        res = s.execute(delete(IdempotencyRecord).where(IdempotencyRecord.expires_at < utcnow()))
        return int(res.rowcount or 0)  # type: ignore[attr-defined]
