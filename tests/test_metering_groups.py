"""Holds and captures done together (one statement or one transaction for many calls), on a
real SQLite and a real PostgreSQL database: every call gets exactly its own outcome, as if it
had been alone, and the books stay exact."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from imgsvc.billing import keys, metering
from imgsvc.billing.charge import Meter
from imgsvc.billing.combine import Combiner
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo
from imgsvc.billing.metering import CaptureRequest, HoldRequest, MonthlyCapReached, UsageRecord
from imgsvc.billing.schema import Account, ApiKey, Hold, LedgerEntry, UsageEvent, utcnow
from imgsvc.errors import InsufficientCredits

TTL = timedelta(minutes=2)
USAGE = UsageRecord("inpaint", "telea", (8, 8), (8, 8), 1, "v-test")


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def _hold(key: KeyInfo, credits: int, rid: str) -> HoldRequest:
    return HoldRequest(key, credits, rid, utcnow() + TTL, "v-test")


def _balance(db: Database, key: KeyInfo) -> int:
    return keys.get_key(db, key.id).credits


def _count(db: Database, table: Any, *where: Any) -> int:
    with db.read() as s:
        return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)


def test_holds_together_each_outcome_its_own(db: Database) -> None:
    info, _ = keys.create_key(db, name="g", credits=25)
    other, _ = keys.create_key(db, name="other", credits=100)
    # Covered together: one group, distinct holds, one ledger row each.
    ids = metering.reserve_many(db, [_hold(info, 5, f"a{i}") for i in range(3)])
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 3
    assert _balance(db, info) == 10
    # Not covered together (12 > 10): each alone, in order: 6 fits, 6 does not, 4 fits.
    out = metering.reserve_many(
        db, [_hold(info, 6, "b1"), _hold(info, 6, "b2"), _hold(info, 4, "b3")]
    )
    assert isinstance(out[0], int) and isinstance(out[2], int)
    assert isinstance(out[1], InsufficientCredits)
    assert out[1].extra == {"credits_required": 6, "credits_remaining": 4}
    assert _balance(db, info) == 0
    # A request id already held fails alone; the others of the group are held.
    out = metering.reserve_many(
        db, [_hold(other, 1, "c1"), _hold(other, 1, "a0"), _hold(other, 1, "c3")]
    )
    assert isinstance(out[0], int) and isinstance(out[2], int)
    assert isinstance(out[1], IntegrityError)
    assert _balance(db, other) == 98
    assert _count(db, Hold, Hold.status == "held") == 7
    assert metering.ledger_mismatches(db) == []


def test_captures_together_refunds_sweeps_and_duplicates(db: Database) -> None:
    info, _ = keys.create_key(db, name="c", credits=100)
    second, _ = keys.create_key(db, name="second", credits=100)
    holds = metering.reserve_many(db, [_hold(info, 10, f"r{i}") for i in range(4)])
    held = metering.reserve_many(db, [_hold(second, 10, "s0")])
    assert all(isinstance(h, int) for h in [*holds, *held])
    h0, h1, h2, h3 = (int(h) for h in holds)
    metering.release(db, hold_id=h2)  # as the sweeper would: captured again from the balance
    requests = [
        CaptureRequest(h0, 10, info, "r0", USAGE),  # the whole hold
        CaptureRequest(h1, 4, info, "r1", USAGE),  # less: 6 back at once
        CaptureRequest(h2, 10, info, "r2", USAGE),  # swept: charged again
        CaptureRequest(h3, 10, info, "r0", USAGE),  # a request id already captured: refused
        CaptureRequest(int(held[0]), 10, second, "s0", USAGE),  # another account
    ]
    out = metering.capture_many(db, requests)
    assert out[0][0] == 10 and out[1][0] == 4 and out[2][0] == 10
    assert isinstance(out[3], IntegrityError)
    assert out[4] == (10, 90)
    # r0, r1 and r2 spent 24; r3's hold is still held (its call failed: its caller releases).
    assert _balance(db, info) == 100 - 24 - 10
    assert metering.release(db, hold_id=h3)
    assert _balance(db, info) == 76
    with db.read() as s:
        rows = dict(s.execute(select(UsageEvent.request_id, UsageEvent.credits)).all())
    assert rows == {"r0": 10, "r1": 4, "r2": 10, "s0": 10}
    assert metering.ledger_mismatches(db) == []


def test_capped_key_refund_in_a_group(db: Database) -> None:
    parent, _ = keys.create_key(db, name="agency", credits=100, scopes="inpaint keys:children")
    child, secret = keys.create_child_key(db, parent, name="client", monthly_cap=20)
    child = keys.authenticate(db, secret)
    holds = [
        metering.reserve(db, key=child, credits=8, request_id=f"k{i}", ttl=TTL) for i in range(2)
    ]
    with pytest.raises(MonthlyCapReached):
        metering.reserve(db, key=child, credits=8, request_id="k2", ttl=TTL)
    out = metering.capture_many(
        db,
        [
            CaptureRequest(holds[0], 3, child, "k0", USAGE),
            CaptureRequest(holds[1], 8, child, "k1", USAGE),
        ],
    )
    assert [o[0] for o in out] == [3, 8]
    assert keys.authenticate(db, secret).month_spent == 11  # 5 unused came back to the month
    assert _balance(db, parent) == 89
    assert metering.ledger_mismatches(db) == []


def test_meter_many_threads_one_account_never_overdraws(db: Database) -> None:
    """64 callers at once on one balance that pays for 40 calls: 40 charged, 24 refused with
    402, never below zero, one usage row per charged call; then the same callers again."""
    info, _ = keys.create_key(db, name="hot", credits=40 * 7)
    meter = Meter(db, hold_ttl=TTL)
    outcomes: list[tuple[int, int] | str] = []
    guard = threading.Lock()
    start = threading.Barrier(64)

    def call(i: int) -> None:
        start.wait()
        try:
            with meter.hold(key=info, credits=7, request_id=f"t{i}", price_version="v") as charge:
                result: tuple[int, int] | str = charge.capture(credits=7, usage=USAGE)
        except InsufficientCredits:
            result = "refused"
        with guard:
            outcomes.append(result)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meter.close()
    charged = [o for o in outcomes if o != "refused"]
    assert len(charged) == 40 and outcomes.count("refused") == 24
    assert all(o[0] == 7 and o[1] >= 0 for o in charged)
    assert _balance(db, info) == 0
    assert _count(db, UsageEvent) == 40
    assert _count(db, Hold, Hold.status == "held") == 0
    assert metering.ledger_mismatches(db) == []


def test_meter_failed_calls_release_their_holds(db: Database) -> None:
    info, _ = keys.create_key(db, name="fail", credits=1000)
    meter = Meter(db, hold_ttl=TTL)
    start = threading.Barrier(32)

    failed: list[int] = []

    def call(i: int) -> None:
        start.wait()
        try:
            with meter.hold(key=info, credits=5, request_id=f"f{i}", price_version="v") as charge:
                if i % 2:
                    charge.capture(credits=5, usage=USAGE)
                raise RuntimeError("the work failed")  # after a capture: charged; before: not
        except RuntimeError:
            failed.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    meter.close()
    assert sorted(failed) == list(range(32))
    assert _balance(db, info) == 1000 - 16 * 5
    assert _count(db, Hold, Hold.status == "released") == 16
    assert metering.ledger_mismatches(db) == []


def test_postgresql_one_statement_per_hold_and_capture(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite runs the steps one statement after another")
    db = Database(database_url)
    db.migrate()
    info, _ = keys.create_key(db, name="one", credits=100)
    statements: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        hold = metering.reserve(db, key=info, credits=10, request_id="o1", ttl=TTL)
        assert metering.capture(
            db, hold_id=hold, credits=7, key=info, request_id="o1", usage=USAGE
        ) == (7, 93)
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    assert len(statements) == 2, statements
    assert metering.ledger_mismatches(db) == []
    db.dispose()


def test_postgresql_connection_dropped_while_idle_is_replaced(database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("no server connections to drop")
    from imgsvc.billing import db as db_module

    database = Database(database_url)
    database.migrate()
    info, _ = keys.create_key(database, name="idle", credits=100)
    metering.reserve(database, key=info, credits=1, request_id="i1", ttl=TTL)  # pools warm
    name = database_url.rsplit("/", 1)[1]
    outside = create_engine(database_url, poolclass=NullPool)
    with outside.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        ).scalar_one()
    outside.dispose()
    assert killed >= 2  # the pools' connections
    time.sleep(db_module.PING_AFTER_IDLE_S + 0.2)
    # Every pooled connection is dead; the ping at checkout finds out, the pool reconnects.
    metering.reserve(database, key=info, credits=1, request_id="i2", ttl=TTL)
    assert keys.get_key(database, info.id).credits == 98
    assert metering.ledger_mismatches(database) == []
    database.dispose()


def test_combiner_groups_waiting_items_and_keeps_keys_apart() -> None:
    groups: list[list[tuple[str, int]]] = []
    first_running = threading.Event()
    let_go = threading.Event()

    def run(items: Sequence[tuple[str, int]]) -> list[int | Exception]:
        groups.append(list(items))
        if len(groups) == 1:
            first_running.set()
            let_go.wait(10)
        return [ValueError(f"odd {n}") if n % 2 else n * 10 for _, n in items]

    combiner: Combiner[tuple[str, int], int] = Combiner(run)
    results: dict[int, int | str] = {}

    def submit(key: str, n: int) -> None:
        try:
            results[n] = combiner.submit(key, (key, n))
        except ValueError as exc:
            results[n] = str(exc)

    lead = threading.Thread(target=submit, args=("a", 0))
    lead.start()
    assert first_running.wait(10)
    waiting = [threading.Thread(target=submit, args=("a", n)) for n in range(1, 6)]
    other = threading.Thread(target=submit, args=("b", 6))
    for t in [*waiting, other]:
        t.start()
    other.join(10)  # another key does not wait for "a"'s group
    assert results[6] == 60
    time.sleep(0.2)  # the waiters have queued
    let_go.set()
    for t in [lead, *waiting]:
        t.join(10)
    assert results == {0: 0, 1: "odd 1", 2: 20, 3: "odd 3", 4: 40, 5: "odd 5", 6: 60}
    by_key_a = [g for g in groups if g[0][0] == "a"]
    assert by_key_a[0] == [("a", 0)] and sorted(by_key_a[1]) == [("a", n) for n in range(1, 6)]


def test_combiner_error_of_whole_group_reaches_every_caller() -> None:
    def run(items: Sequence[int]) -> list[int | Exception]:
        raise RuntimeError("database gone")

    combiner: Combiner[int, int] = Combiner(run)
    with pytest.raises(RuntimeError, match="database gone"):
        combiner.submit("k", 1)
    with pytest.raises(RuntimeError, match="database gone"):  # and the key is free again
        combiner.submit("k", 2)


def test_schema_constraint_still_guards_balances(db: Database) -> None:
    """The fast paths write through the same tables: the database itself refuses a negative
    balance (the last line of defence under any path)."""
    info, _ = keys.create_key(db, name="neg", credits=1)
    with pytest.raises(IntegrityError), db.connection() as conn:
        conn.execute(update(Account).where(Account.id == info.account_id).values(credits=-1))
    assert _balance(db, info) == 1
    assert _count(db, LedgerEntry) == 1 and _count(db, ApiKey) == 1
