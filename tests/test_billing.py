"""Keys and metering against a real SQLite database (WAL, BEGIN IMMEDIATE)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import event, select, update

from imgsvc.billing import keys, metering
from imgsvc.billing.db import Database
from imgsvc.billing.metering import UsageRecord
from imgsvc.billing.schema import ApiKey, LedgerEntry
from imgsvc.errors import InsufficientCredits, Unauthorized


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'billing.db'}")
    database.create_schema()
    return database


def test_key_format_and_checksum() -> None:
    secret = keys.generate_secret()
    assert secret.startswith("isk_")
    assert keys.is_well_formed(secret)
    flipped = secret[:10] + ("A" if secret[10] != "A" else "B") + secret[11:]
    assert not keys.is_well_formed(flipped)
    assert not keys.is_well_formed("isk_short_AAAAAA")
    assert not keys.is_well_formed("")


def test_bad_checksum_rejected_without_database_query(db: Database) -> None:
    queries: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda *a: queries.append(a[2]))
    secret = keys.generate_secret()
    with pytest.raises(Unauthorized):
        keys.authenticate(db, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert queries == []


def test_only_hash_stored_and_revoke(db: Database) -> None:
    info, secret = keys.create_key(db, name="shop", credits=5)
    assert keys.authenticate(db, secret).id == info.id
    with db.transaction() as s:
        stored = s.execute(select(ApiKey.key_hash)).scalar_one()
    assert stored == keys.hash_secret(secret) and secret not in stored
    keys.revoke_key(db, info.id)
    with pytest.raises(Unauthorized):
        keys.authenticate(db, secret)


def _usage() -> UsageRecord:
    return UsageRecord("remove-background", "u2netp", (10, 10), (10, 10), 5)


def test_reserve_capture_release_keep_ledger_exact(db: Database) -> None:
    info, _ = keys.create_key(db, name="a", credits=3)
    metering.reserve(db, key_id=info.id, credits=2, request_id="r1")
    assert metering.capture(db, key_id=info.id, credits=2, request_id="r1", usage=_usage()) == 1
    metering.reserve(db, key_id=info.id, credits=1, request_id="r2")
    metering.release(db, key_id=info.id, credits=1, request_id="r2")
    with pytest.raises(InsufficientCredits) as refused:
        metering.reserve(db, key_id=info.id, credits=2, request_id="r3")
    assert refused.value.headers == {"X-Credits-Required": "2", "X-Credits-Remaining": "1"}
    assert keys.get_key(db, info.id).credits == 1
    assert metering.ledger_mismatches(db) == []
    rows = metering.list_usage(db, key_id=info.id)
    assert [r.request_id for r in rows] == ["r1"]
    with db.transaction() as s:
        kinds = [e.kind for e in s.scalars(select(LedgerEntry).order_by(LedgerEntry.id))]
    assert kinds == ["grant", "hold", "hold", "release"]


def test_concurrent_reservations_never_overdraw(db: Database) -> None:
    info, _ = keys.create_key(db, name="race", credits=25)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            metering.reserve(db, key_id=info.id, credits=1, request_id=f"r{i}")
            ok = True
        except InsufficientCredits:
            ok = False
        with lock:
            outcomes.append(ok)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count(True) == 25
    assert keys.get_key(db, info.id).credits == 0
    assert metering.ledger_mismatches(db) == []


def test_topup_and_verify_detects_tampering(db: Database) -> None:
    info, _ = keys.create_key(db, name="t", credits=1)
    assert keys.topup(db, info.id, 9).credits == 10
    assert metering.ledger_mismatches(db) == []
    with db.transaction() as s:
        s.execute(update(ApiKey).values(credits=999))
    assert metering.ledger_mismatches(db) == [(info.id, 999, 10)]
