"""Keys, holds, the ledger and usage on a real SQLite and a real PostgreSQL database."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import event, select, update

from imgsvc.billing import keys, metering, usage
from imgsvc.billing.db import Database
from imgsvc.billing.metering import MonthlyCapReached, UsageRecord
from imgsvc.billing.schema import Account, ApiKey, Hold, LedgerEntry, utcnow
from imgsvc.errors import Forbidden, InsufficientCredits, InvalidInput, Unauthorized
from imgsvc.routes.errors import error_headers

TTL = timedelta(minutes=2)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def _usage(model: str = "u2netp", client_ref: str | None = None) -> UsageRecord:
    return UsageRecord("remove-background", model, (10, 10), (10, 10), 5, "v-test", client_ref)


def _kinds(db: Database) -> list[str]:
    with db.transaction() as s:
        return [e.kind for e in s.scalars(select(LedgerEntry).order_by(LedgerEntry.id))]


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


def test_only_hash_stored_revoke_and_expiry(db: Database) -> None:
    info, secret = keys.create_key(db, name="shop", credits=5)
    assert keys.authenticate(db, secret).id == info.id
    with db.transaction() as s:
        stored = s.execute(select(ApiKey.key_hash)).scalar_one()
    assert stored == keys.hash_secret(secret) and secret not in stored
    keys.revoke_key(db, info.id)
    with pytest.raises(Unauthorized):
        keys.authenticate(db, secret)
    _, old_secret = keys.create_key(
        db, name="old", credits=1, expires_at=utcnow() - timedelta(seconds=1)
    )
    with pytest.raises(Unauthorized):
        keys.authenticate(db, old_secret)


def test_rotate_keeps_account_and_expires_old_key(db: Database) -> None:
    info, old = keys.create_key(db, name="rot", credits=7, scopes="upscale")
    new_info, new = keys.rotate_key(db, info.id, old_valid_for=timedelta(hours=1))
    assert new_info.account_id == info.account_id and new_info.scopes == ("upscale",)
    assert keys.authenticate(db, old).expires_at is not None
    assert keys.authenticate(db, new).credits == 7
    keys.rotate_key(db, new_info.id, old_valid_for=timedelta(0))
    with pytest.raises(Unauthorized):
        keys.authenticate(db, new)


def test_scopes_and_rate_limit_validated(db: Database) -> None:
    with pytest.raises(InvalidInput):
        keys.create_key(db, name="x", credits=0, scopes="fly")
    with pytest.raises(InvalidInput):
        keys.create_key(db, name="x", credits=0, rate_limit="lots")
    info, _ = keys.create_key(db, name="x", credits=0, scopes="upscale,inpaint")
    assert info.scopes == ("upscale", "inpaint") and not info.may("remove-background")


def test_hold_capture_release_keep_ledger_exact(db: Database) -> None:
    info, _ = keys.create_key(db, name="a", credits=10)
    h1 = metering.reserve(db, key=info, credits=4, request_id="r1", ttl=TTL, price_version="v-test")
    assert metering.capture(
        db, hold_id=h1, credits=3, key=info, request_id="r1", usage=_usage()
    ) == (3, 7)  # captured less than held: the unused credit comes back at once
    h2 = metering.reserve(db, key=info, credits=5, request_id="r2", ttl=TTL)
    assert metering.release(db, hold_id=h2)
    assert not metering.release(db, hold_id=h2)  # a second release does nothing
    with pytest.raises(InsufficientCredits) as refused:
        metering.reserve(db, key=info, credits=8, request_id="r3", ttl=TTL)
    assert error_headers(refused.value) == {"X-Credits-Required": "8", "X-Credits-Remaining": "7"}
    assert refused.value.extra == {"credits_required": 8, "credits_remaining": 7}
    assert keys.get_key(db, info.id).credits == 7
    assert metering.ledger_mismatches(db) == []
    rows = usage.list_usage(db, usage.UsageFilter(key_id=info.id))
    assert [(r.request_id, r.credits, r.price_version) for r in rows] == [("r1", 3, "v-test")]
    assert _kinds(db) == ["grant", "hold", "capture", "hold", "release"]
    with db.transaction() as s:
        versions = [
            e.price_version for e in s.scalars(select(LedgerEntry).order_by(LedgerEntry.id))
        ]
    assert versions[:3] == [None, "v-test", "v-test"]  # each charge row keeps its price table


def test_concurrent_holds_never_overdraw(db: Database) -> None:
    info, _ = keys.create_key(db, name="race", credits=25)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            metering.reserve(db, key=info, credits=1, request_id=f"r{i}", ttl=TTL)
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
    assert metering.held_credits(db, info.account_id) == 25
    assert metering.ledger_mismatches(db) == []


def test_expired_holds_are_swept(db: Database) -> None:
    info, _ = keys.create_key(db, name="dead", credits=5)
    metering.reserve(db, key=info, credits=5, request_id="r1", ttl=timedelta(seconds=1))
    assert metering.sweep_expired(db) == 0
    assert metering.sweep_expired(db, now=utcnow() + timedelta(seconds=2)) == 1
    assert keys.get_key(db, info.id).credits == 5
    with db.transaction() as s:
        assert s.scalar(select(Hold.status)) == "released"
    assert metering.ledger_mismatches(db) == []


def test_capture_after_sweep_charges_again_or_not_at_all(db: Database) -> None:
    info, _ = keys.create_key(db, name="slow", credits=5)
    hold = metering.reserve(db, key=info, credits=5, request_id="r1", ttl=TTL)
    metering.release(db, hold_id=hold)  # as the sweeper would
    assert metering.capture(
        db, hold_id=hold, credits=5, key=info, request_id="r1", usage=_usage()
    ) == (5, 0)
    assert metering.ledger_mismatches(db) == []


def test_sub_keys_draw_from_parent_with_monthly_cap(db: Database) -> None:
    parent, _ = keys.create_key(
        db, name="agency", credits=100, scopes="remove-background upscale keys:children"
    )
    child, child_secret = keys.create_child_key(db, parent, name="client-a", monthly_cap=10)
    assert child.account_id == parent.account_id and "keys:children" not in child.scopes
    child = keys.authenticate(db, child_secret)
    h = metering.reserve(db, key=child, credits=6, request_id="c1", ttl=TTL)
    metering.capture(db, hold_id=h, credits=6, key=child, request_id="c1", usage=_usage())
    child = keys.authenticate(db, child_secret)
    assert child.month_spent == 6 and child.credits == 94
    with pytest.raises(MonthlyCapReached):
        metering.reserve(db, key=child, credits=5, request_id="c2", ttl=TTL)
    assert keys.get_key(db, parent.id).credits == 94  # the refused hold took nothing
    h = metering.reserve(db, key=child, credits=4, request_id="c3", ttl=TTL)
    metering.release(db, hold_id=h)
    assert keys.authenticate(db, child_secret).month_spent == 6
    keys.revoke_key(db, parent.id)
    with pytest.raises(Unauthorized):  # revoking the reseller revokes its sub-keys
        keys.authenticate(db, child_secret)
    with pytest.raises(Forbidden):
        keys.create_child_key(db, child, name="grandchild", monthly_cap=None)
    assert metering.ledger_mismatches(db) == []


def test_usage_summary_and_client_refs(db: Database) -> None:
    info, _ = keys.create_key(db, name="s", credits=100)
    for i, ref in enumerate(["shop-1", "shop-1", "shop-2"]):
        h = metering.reserve(db, key=info, credits=2, request_id=f"u{i}", ttl=TTL)
        metering.capture(
            db, hold_id=h, credits=2, key=info, request_id=f"u{i}", usage=_usage(client_ref=ref)
        )
    where = usage.UsageFilter(account_id=info.account_id)
    by_ref = usage.summarize(db, where, "client_ref")
    assert [(g.group, g.calls, g.credits) for g in by_ref] == [("shop-1", 2, 4), ("shop-2", 1, 2)]
    (day,) = usage.summarize(db, where, "day")
    assert day.group == utcnow().strftime("%Y-%m-%d") and day.calls == 3
    only = usage.list_usage(db, usage.UsageFilter(client_ref="shop-2"))
    assert [r.request_id for r in only] == ["u2"]
    csv_text = usage.usage_csv(usage.list_usage(db, where))
    assert csv_text.splitlines()[0].startswith("request_id,key_id,operation")
    assert len(csv_text.strip().splitlines()) == 4


def test_verify_detects_tampering(db: Database) -> None:
    info, _ = keys.create_key(db, name="t", credits=1)
    assert keys.topup(db, info.id, 9).credits == 10
    assert metering.ledger_mismatches(db) == []
    with db.transaction() as s:
        s.execute(update(Account).values(credits=999))
    assert metering.ledger_mismatches(db) == [
        f"account #{info.account_id}: balance 999 != ledger sum 10"
    ]
