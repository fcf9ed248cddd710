"""Idempotency claims on a real SQLite and a real PostgreSQL database: a charged call's response
is stored in its capture's transaction (charged exactly when stored), a claim is a lease that a
heartbeat keeps and that a later request takes over once it has run out, and a request whose
claim was taken over can neither store its response nor charge."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from imgsvc.billing import idempotency, keys, metering
from imgsvc.billing.charge import Meter
from imgsvc.billing.db import Database
from imgsvc.billing.idempotency import (
    Claim,
    Claims,
    Completion,
    IdempotencyInProgress,
    StoredResponse,
)
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import UsageRecord
from imgsvc.billing.schema import Hold, IdempotencyRecord, UsageEvent

USAGE = UsageRecord("inpaint", "telea", (8, 8), (8, 8), 1, "v-test")
PRICE = 10


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def _claim(db: Database, key: KeyInfo, idem_key: str, lease: timedelta) -> Claim:
    claimed = idempotency.begin(
        db, key_id=key.id, idem_key=idem_key, fingerprint="f" * 64, lease=lease
    )
    assert isinstance(claimed, Claim)
    return claimed


def _completion(claim: Claim) -> Completion:
    def render(charged: int, remaining: int) -> StoredResponse:
        headers = {"X-Credits-Charged": str(charged), "X-Credits-Remaining": str(remaining)}
        return StoredResponse(200, headers, b"result", "image/png")

    return Completion(claim, render)


def _usage_rows(db: Database) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(UsageEvent)) or 0)


def _record(db: Database, key: KeyInfo, idem_key: str) -> IdempotencyRecord | None:
    with db.read() as s:
        return s.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.key_id == key.id, IdempotencyRecord.idem_key == idem_key
            )
        ).one_or_none()


def test_the_response_is_stored_with_the_charge(db: Database) -> None:
    info, _ = keys.create_key(db, name="c", credits=100)
    meter = Meter(db, hold_ttl=timedelta(minutes=2))
    try:
        claim = _claim(db, info, "order-1", timedelta(minutes=2))
        with meter.hold(key=info, credits=PRICE, request_id="r1", price_version="v") as charge:
            charged, remaining = charge.capture(
                credits=PRICE, usage=USAGE, completion=_completion(claim)
            )
    finally:
        meter.close()
    assert (charged, remaining) == (PRICE, 90)
    record = _record(db, info, "order-1")
    assert record is not None and record.status == "done" and record.response_body == b"result"
    # Kept for the whole retention from now on, not for the lease of the running call.
    assert record.expires_at - record.created_at > timedelta(hours=23)
    replay = idempotency.begin(db, key_id=info.id, idem_key="order-1", fingerprint="f" * 64)
    assert isinstance(replay, StoredResponse)
    assert replay.headers == {"X-Credits-Charged": "10", "X-Credits-Remaining": "90"}


def test_a_claim_taken_over_neither_stores_nor_charges(db: Database) -> None:
    """The first request's lease ran out (its process stalled) and a retry took the key over:
    the first one's capture fails as a whole, so the key's answer and its charge stay the
    retry's alone."""
    info, _ = keys.create_key(db, name="t", credits=100)
    stale = _claim(db, info, "order-2", timedelta(seconds=-1))  # already run out
    fresh = _claim(db, info, "order-2", timedelta(minutes=2))
    assert fresh.token != stale.token
    meter = Meter(db, hold_ttl=timedelta(minutes=2))
    try:
        with (
            pytest.raises(IdempotencyInProgress),
            meter.hold(key=info, credits=PRICE, request_id="r2", price_version="v") as charge,
        ):
            charge.capture(credits=PRICE, usage=USAGE, completion=_completion(stale))
    finally:
        meter.close()
    assert keys.get_key(db, info.id).credits == 100
    assert _usage_rows(db) == 0
    with db.read() as s:
        assert s.scalar(select(Hold.status).where(Hold.request_id == "r2")) == "released"
    record = _record(db, info, "order-2")
    assert record is not None and record.status == "running" and record.claim == fresh.token
    # The stale request's abort leaves the retry's claim alone.
    idempotency.abort(db, stale)
    assert _record(db, info, "order-2") is not None
    assert metering.ledger_mismatches(db) == []


def test_a_running_claim_is_refused_until_its_lease_runs_out(db: Database) -> None:
    info, _ = keys.create_key(db, name="l", credits=100)
    _claim(db, info, "order-3", timedelta(seconds=1))
    with pytest.raises(IdempotencyInProgress):
        idempotency.begin(db, key_id=info.id, idem_key="order-3", fingerprint="f" * 64)
    time.sleep(1.2)
    assert isinstance(_claim(db, info, "order-3", timedelta(minutes=2)), Claim)


def test_the_heartbeat_keeps_a_running_claim(db: Database) -> None:
    info, _ = keys.create_key(db, name="h", credits=100)
    claims = Claims(db, lease=timedelta(seconds=1.5))
    try:
        claim = claims.begin(key_id=info.id, idem_key="order-4", fingerprint="f" * 64)
        assert isinstance(claim, Claim)
        time.sleep(3)  # twice the lease: only the heartbeat keeps it
        with pytest.raises(IdempotencyInProgress):
            idempotency.begin(db, key_id=info.id, idem_key="order-4", fingerprint="f" * 64)
        claims.done(claim)
        time.sleep(2)  # no longer renewed: it runs out
        assert isinstance(_claim(db, info, "order-4", timedelta(minutes=2)), Claim)
    finally:
        claims.close()
