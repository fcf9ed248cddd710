"""Holds: reserve credits before work, capture on success, release on failure or expiry.

A hold is one conditional UPDATE (`credits >= n`, never a read-then-write) plus its ledger row,
in one transaction, so concurrent calls can never overdraw. A hold carries an expiry that the
running call keeps extending; if the process dies, `sweep_expired` releases it.

The call path (`reserve`, `capture`, `release`) runs Core statements on a connection of its own,
without an ORM session. On PostgreSQL a hold and a capture are each one statement (the steps as
data-modifying `WITH` parts) that is its own transaction: one round trip, and the balance row
is locked only while the server runs it, never while the caller's process is busy. The `*_in`
functions run the same steps one statement after another in a caller's session (a batch job's
transaction); SQLite, capped keys and rare cases (an expired hold) take that path too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Row,
    func,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from imgsvc.billing import idempotency
from imgsvc.billing import statements as sql
from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo, current_month
from imgsvc.billing.schema import Account, Hold, LedgerEntry, utcnow
from imgsvc.errors import InsufficientCredits, ServiceError

log = logging.getLogger("imgsvc.billing")
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class UsageRecord:
    """What a successful call did, as stored on its usage row."""

    operation: str
    model: str
    input_size: tuple[int, int]
    output_size: tuple[int, int]
    duration_ms: int
    price_version: str
    client_ref: str | None = None


class MonthlyCapReached(InsufficientCredits):
    code = "monthly_cap_reached"


@dataclass(frozen=True)
class HoldRequest:
    """One call's hold, as `reserve` takes it."""

    key: KeyInfo
    credits: int
    request_id: str
    expires_at: datetime
    price_version: str | None = None


@dataclass(frozen=True)
class CaptureRequest:
    """One call's capture, as `capture` takes it."""

    hold_id: int
    credits: int
    key: KeyInfo
    request_id: str
    usage: UsageRecord
    # The response stored for the call's Idempotency-Key, in the capture's transaction.
    completion: idempotency.Completion | None = None


# A hold as settling reads it: (id, account_id, key_id, amount, request_id, price_version,
# created_at).
HoldRow = Row[int, int, int, int, str, str | None, datetime]


def reserve(
    db: Database,
    *,
    key: KeyInfo,
    credits: int,
    request_id: str,
    ttl: timedelta,
    price_version: str | None = None,
) -> int:
    """Hold `credits` of the key's account; return the hold id. Refusal takes nothing."""
    return _reserve_one(db, HoldRequest(key, credits, request_id, utcnow() + ttl, price_version))


def _reserve_one(db: Database, request: HoldRequest) -> int:
    key = request.key
    if db.dialect == "postgresql" and key.monthly_cap is None:
        ids = _pg_reserve(db, [request])
        if ids is None:
            with db.read() as s:
                raise _insufficient(request.credits, 1, _balance(s.connection(), key.account_id))
        return ids[0]
    # Not waiting for the disk is safe here: a hold forgotten by a crash returns its credits.
    with db.connection(durable=False) as conn:
        return _reserve_request(conn, request)


def _reserve_request(conn: Connection, request: HoldRequest) -> int:
    (hold_id,) = _reserve(
        conn,
        key=request.key,
        amounts=[request.credits],
        request_ids=[request.request_id],
        expires_at=request.expires_at,
        price_version=request.price_version,
    )
    return hold_id


def _each_in_savepoint(
    db: Database,
    items: Sequence[_Item],
    run: Callable[[Connection, _Item], _Result],
    *,
    durable: bool,
) -> list[_Result | Exception]:
    """`run` for each item in one transaction (one commit), each in a savepoint: an item that
    fails (refused, or a database error) is rolled back alone and gets its exception."""
    outcomes: list[_Result | Exception] = []
    with db.connection(durable=durable) as conn:
        for item in items:
            try:
                with conn.begin_nested():
                    outcomes.append(run(conn, item))
            except (ServiceError, SQLAlchemyError) as exc:
                outcomes.append(exc)
    return outcomes


def reserve_many(db: Database, requests: Sequence[HoldRequest]) -> list[int | Exception]:
    """The holds of several calls. PostgreSQL (one account, keys without a monthly cap): one
    statement when the balance covers them all; else, or on any error, each as if alone.
    SQLite: one transaction, each hold in a savepoint of its own. Every call gets its own
    outcome: its hold id, or the exception `reserve` would raise for it."""
    if db.dialect == "sqlite":
        return _each_in_savepoint(db, requests, _reserve_request, durable=False)
    if len(requests) > 1:
        try:
            ids = _pg_reserve(db, requests)
        except SQLAlchemyError:
            ids = None  # e.g. a request id taken: alone, only that call fails
        if ids is not None:
            return list(ids)
    outcomes: list[int | Exception] = []
    for request in requests:
        try:
            outcomes.append(_reserve_one(db, request))
        except Exception as exc:  # noqa: BLE001 - handed to that call's caller
            outcomes.append(exc)
    return outcomes


def _pg_reserve(db: Database, requests: Sequence[HoldRequest]) -> list[int] | None:
    """All of `requests` (one account) in one statement; None when the balance does not cover
    their total (nothing written)."""
    first = requests[0]
    common = {
        "p_account_id": first.key.account_id,
        "p_total": sum(r.credits for r in requests),
        "p_now": utcnow(),
    }
    if len(requests) == 1:  # the usual case, without arrays to send
        statement, values = (
            sql.PG_HOLD,
            {
                "p_key_id": first.key.id,
                "p_request_id": first.request_id,
                "p_amount": first.credits,
                "p_price_version": first.price_version,
                "p_expires_at": first.expires_at,
            },
        )
    else:
        statement, values = (
            sql.PG_HOLDS,
            {
                "p_key_ids": [r.key.id for r in requests],
                "p_request_ids": [r.request_id for r in requests],
                "p_amounts": [r.credits for r in requests],
                "p_price_versions": [r.price_version for r in requests],
                "p_expires_ats": [r.expires_at for r in requests],
            },
        )
    with db.statements() as conn:
        rows = conn.execute(statement, {**common, **values}).all()
    if not rows:
        return None
    by_request = {request_id: int(hold_id) for hold_id, request_id, _ in rows}
    return [by_request[r.request_id] for r in requests]


def reserve_in(
    s: Session,
    *,
    key: KeyInfo,
    amounts: Sequence[int],
    request_ids: Sequence[str],
    expires_at: datetime,
    price_version: str | None,
) -> list[int]:
    """Hold several amounts at once, in the caller's transaction (a batch job's items): one
    conditional UPDATE for the total, so all are held or none. Returns the hold ids in order."""
    return _reserve(
        _connection(s),
        key=key,
        amounts=amounts,
        request_ids=request_ids,
        expires_at=expires_at,
        price_version=price_version,
    )


def _reserve(
    conn: Connection,
    *,
    key: KeyInfo,
    amounts: Sequence[int],
    request_ids: Sequence[str],
    expires_at: datetime,
    price_version: str | None,
) -> list[int]:
    credits = sum(amounts)
    taken = conn.execute(sql.TAKE, {"p_account_id": key.account_id, "p_credits": credits})
    if taken.rowcount != 1:
        raise _insufficient(credits, len(amounts), _balance(conn, key.account_id))
    if key.monthly_cap is not None and not _charge_cap(conn, key.id, credits, current_month()):
        # Raising inside the transaction rolls the balance update back too.
        raise MonthlyCapReached(
            f"this costs {credits} credits; this key has spent {key.month_spent} of "
            f"its monthly cap of {key.monthly_cap}",
            extra={"credits_required": credits, "monthly_cap": key.monthly_cap},
        )
    ids: list[int] = []
    now = utcnow()
    for amount, request_id in zip(amounts, request_ids, strict=True):
        hold_id = conn.execute(
            sql.NEW_HOLD,
            {
                "account_id": key.account_id,
                "key_id": key.id,
                "request_id": request_id,
                "amount": amount,
                "price_version": price_version,
                "status": "held",
                "expires_at": expires_at,
                "created_at": now,
            },
        ).scalar_one()
        ids.append(int(hold_id))
    conn.execute(
        sql.NEW_ENTRY,
        [
            {
                "account_id": key.account_id,
                "key_id": key.id,
                "hold_id": hold_id,
                "delta": -amount,
                "kind": "hold",
                "request_id": request_id,
                "price_version": price_version,
                "created_at": now,
            }
            for hold_id, amount, request_id in zip(ids, amounts, request_ids, strict=True)
        ],
    )
    return ids


def _insufficient(credits: int, count: int, balance: int) -> InsufficientCredits:
    what = "this call costs" if count == 1 else f"these {count} items cost"
    return InsufficientCredits(
        f"{what} {credits} credits and the account has {balance}; top up and retry",
        extra={"credits_required": credits, "credits_remaining": balance},
    )


def _charge_cap(conn: Connection, key_id: int, credits: int, month: str) -> bool:
    """Add to a capped key's month_spent unless that would pass the cap (one UPDATE)."""
    res = conn.execute(sql.CHARGE_CAP, {"p_key_id": key_id, "p_credits": credits, "p_month": month})
    return res.rowcount == 1


def _uncharge_cap(conn: Connection, hold: HoldRow, credits: int) -> None:
    """Give back unused credits to a capped key's month (never below zero)."""
    if credits <= 0:
        return
    conn.execute(
        sql.UNCHARGE_CAP,
        {"p_key_id": hold.key_id, "p_credits": credits, "p_month": current_month(hold.created_at)},
    )


def _entry(conn: Connection, hold: HoldRow, delta: int, kind: str) -> None:
    conn.execute(
        sql.NEW_ENTRY,
        {
            "account_id": hold.account_id,
            "key_id": hold.key_id,
            "hold_id": hold.id,
            "delta": delta,
            "kind": kind,
            "request_id": hold.request_id,
            "price_version": hold.price_version,
            "created_at": utcnow(),
        },
    )


def _balance(conn: Connection, account_id: int) -> int:
    return int(conn.scalar(sql.BALANCE, {"p_account_id": account_id}) or 0)


def _settle(conn: Connection, hold_id: int, status: str) -> HoldRow | None:
    """Move a hold out of `held` (one conditional UPDATE); None if it was already settled."""
    return conn.execute(
        sql.SETTLE, {"p_hold_id": hold_id, "p_status": status, "p_now": utcnow()}
    ).one_or_none()


def _credit(conn: Connection, account_id: int, credits: int) -> None:
    if credits:
        conn.execute(sql.CREDIT, {"p_account_id": account_id, "p_credits": credits})


def _connection(s: Session) -> Connection:
    """The session's connection, with its pending objects written first (as its own
    statements would do), so the Core statements here see them."""
    s.flush()
    return s.connection()


def extend(db: Database, *, hold_ids: list[int], ttl: timedelta) -> None:
    """Push the expiry of running calls' holds forward (their heartbeat), in one UPDATE."""
    with db.connection(durable=False) as conn:
        conn.execute(sql.EXTEND, {"p_hold_ids": hold_ids, "p_expires_at": utcnow() + ttl})


def release(db: Database, *, hold_id: int) -> bool:
    """Give a hold back (the call failed). False if it was already settled."""
    # Forgetting a release is safe: the hold expires and the sweeper releases it again.
    with db.connection(durable=False) as conn:
        return _release(conn, hold_id)


def release_in(s: Session, *, hold_id: int) -> bool:
    """`release` in the caller's transaction."""
    return _release(_connection(s), hold_id)


def _release(conn: Connection, hold_id: int) -> bool:
    hold = _settle(conn, hold_id, "released")
    if hold is None:
        return False
    _credit(conn, hold.account_id, hold.amount)
    _uncharge_cap(conn, hold, hold.amount)
    _entry(conn, hold, hold.amount, "release")
    return True


def capture(
    db: Database,
    *,
    hold_id: int,
    credits: int,
    key: KeyInfo,
    request_id: str,
    usage: UsageRecord,
    completion: idempotency.Completion | None = None,
) -> tuple[int, int]:
    """Charge `credits` (at most the hold) and record the usage; return (charged, remaining).

    The unused part of the hold goes back in the same transaction, and so is the response of
    `completion` stored (nothing is charged if it cannot be). If the hold had expired and was
    swept meanwhile, the charge is taken again only if the balance allows it (never
    negative); otherwise the call is recorded as free.
    """
    request = CaptureRequest(hold_id, credits, key, request_id, usage, completion)
    if db.dialect == "postgresql" and completion is None:
        done = _pg_capture(db, [request])
        if hold_id in done:  # else the hold was settled already (swept): the general path
            return done[hold_id]
    with db.connection() as conn:
        return _capture_one(conn, request)


def _capture_one(conn: Connection, r: CaptureRequest) -> tuple[int, int]:
    charged = _capture(
        conn,
        hold_id=r.hold_id,
        credits=r.credits,
        account_id=r.key.account_id,
        key_id=r.key.id,
        request_id=r.request_id,
        usage=r.usage,
        job_item=None,
    )
    remaining = _balance(conn, r.key.account_id)
    if r.completion is not None:
        idempotency.complete_in(conn, r.completion, charged, remaining)
    return charged, remaining


def capture_many(
    db: Database, requests: Sequence[CaptureRequest]
) -> list[tuple[int, int] | Exception]:
    """Several calls' captures at once. PostgreSQL: one statement; a capture it cannot do (its
    hold was swept), or all of them if it fails, is then done alone. SQLite: one transaction
    (one commit, one wait for the disk: SQLite has no group commit of its own), each capture
    in a savepoint of its own. A capture that stores an idempotent response is done alone on
    PostgreSQL. Every call gets its own outcome: (charged, remaining), or the exception
    `capture` would raise for it."""
    if db.dialect == "sqlite":
        return _each_in_savepoint(db, requests, _capture_one, durable=True)
    done: dict[int, tuple[int, int]] = {}
    plain = [r for r in requests if r.completion is None]
    if len(plain) > 1:
        try:
            done = _pg_capture(db, plain)
        except SQLAlchemyError:
            done = {}  # e.g. a request id captured twice: alone, only that call fails
    outcomes: list[tuple[int, int] | Exception] = []
    for r in requests:
        if r.hold_id in done:
            outcomes.append(done[r.hold_id])
            continue
        try:
            outcomes.append(
                capture(
                    db,
                    hold_id=r.hold_id,
                    credits=r.credits,
                    key=r.key,
                    request_id=r.request_id,
                    usage=r.usage,
                    completion=r.completion,
                )
            )
        except Exception as exc:  # noqa: BLE001 - handed to that call's caller
            outcomes.append(exc)
    return outcomes


def _pg_capture(db: Database, requests: Sequence[CaptureRequest]) -> dict[int, tuple[int, int]]:
    """`requests` in one statement: (charged, remaining) by hold id, for the holds that were
    still held (the others are left untouched)."""
    rows = [
        {
            "hold_id": r.hold_id,
            "credits": r.credits,
            **_usage_values(r.key.account_id, r.key.id, r.request_id, r.usage, None),
        }
        for r in requests
    ]
    if len(rows) == 1:
        statement, values = sql.PG_CAPTURE, {f"p_{k}": v for k, v in rows[0].items()}
    else:
        statement, values = (
            sql.PG_CAPTURES,
            {f"p_{k}s": [row[k] for row in rows] for k in sql.CAPTURE_FIELDS},
        )
    with db.statements() as conn:
        found = conn.execute(statement, {**values, "p_now": utcnow()}).all()
    return {int(hold_id): (int(charged), int(remaining)) for hold_id, charged, remaining in found}


def capture_in(
    s: Session,
    *,
    hold_id: int,
    credits: int,
    account_id: int,
    key_id: int,
    request_id: str,
    usage: UsageRecord,
    job_item: tuple[str, int] | None = None,
) -> int:
    """`capture` in the caller's transaction; returns the credits charged. With `job_item`,
    the usage row carries (job, item), unique: a second capture of an item fails the whole
    transaction (IntegrityError) instead of charging twice."""
    return _capture(
        _connection(s),
        hold_id=hold_id,
        credits=credits,
        account_id=account_id,
        key_id=key_id,
        request_id=request_id,
        usage=usage,
        job_item=job_item,
    )


def _capture(
    conn: Connection,
    *,
    hold_id: int,
    credits: int,
    account_id: int,
    key_id: int,
    request_id: str,
    usage: UsageRecord,
    job_item: tuple[str, int] | None,
) -> int:
    hold = _settle(conn, hold_id, "captured")
    if hold is not None:
        charged = min(max(credits, 0), int(hold.amount))
        unused = hold.amount - charged
        _credit(conn, hold.account_id, unused)
        _uncharge_cap(conn, hold, unused)
        _entry(conn, hold, unused, "capture")
    else:
        charged = _charge_again(conn, account_id, key_id, credits, request_id)
    conn.execute(
        sql.NEW_USAGE,
        {
            "credits": charged,
            "created_at": utcnow(),
            **_usage_values(account_id, key_id, request_id, usage, job_item),
        },
    )  # a second capture of a (job, item) or request id fails here: IntegrityError
    return charged


def _usage_values(
    account_id: int,
    key_id: int,
    request_id: str,
    usage: UsageRecord,
    job_item: tuple[str, int] | None,
) -> dict[str, Any]:
    """The usage row's columns other than credits and created_at."""
    job_id, item = job_item if job_item is not None else (None, None)
    return {
        "account_id": account_id,
        "key_id": key_id,
        "request_id": request_id,
        "operation": usage.operation,
        "model": usage.model,
        "client_ref": usage.client_ref,
        "input_width": usage.input_size[0],
        "input_height": usage.input_size[1],
        "output_width": usage.output_size[0],
        "output_height": usage.output_size[1],
        "price_version": usage.price_version,
        "duration_ms": usage.duration_ms,
        "job_id": job_id,
        "item": item,
    }


def balance(s: Session, account_id: int) -> int:
    """An account's credits, read in the caller's transaction."""
    return _balance(_connection(s), account_id)


def _charge_again(
    conn: Connection, account_id: int, key_id: int, credits: int, request_id: str
) -> int:
    taken = conn.execute(sql.TAKE, {"p_account_id": account_id, "p_credits": credits})
    if taken.rowcount != 1 or credits <= 0:
        log.warning("request %s: hold expired and balance too low; not charged", request_id)
        return 0
    conn.execute(
        sql.NEW_ENTRY,
        {
            "account_id": account_id,
            "key_id": key_id,
            "hold_id": None,
            "delta": -credits,
            "kind": "charge",
            "request_id": request_id,
            "price_version": None,
            "created_at": utcnow(),
        },
    )
    return credits


def sweep_expired(db: Database, *, now: datetime | None = None) -> int:
    """Release every hold whose call died (expired without capture). Returns how many."""
    cutoff = now or utcnow()
    with db.read() as s:
        ids = list(
            s.scalars(select(Hold.id).where(Hold.status == "held", Hold.expires_at < cutoff))
        )
    released = sum(release(db, hold_id=i) for i in ids)
    if released:
        log.info("released %d expired hold(s)", released)
    return released


def held_credits(db: Database, account_id: int) -> int:
    with db.read() as s:
        total = s.scalar(
            select(func.coalesce(func.sum(Hold.amount), 0)).where(
                Hold.account_id == account_id, Hold.status == "held"
            )
        )
        return int(total or 0)


def ledger_mismatches(db: Database) -> list[str]:
    """Every way the books disagree: balance vs ledger sum, negative balance, unsettled holds
    without a hold row, settled holds without exactly one settling row. Empty = clean."""
    problems: list[str] = []
    sums = (
        select(LedgerEntry.account_id, func.sum(LedgerEntry.delta).label("total"))
        .group_by(LedgerEntry.account_id)
        .subquery()
    )
    settle_rows = (
        select(LedgerEntry.hold_id, func.count().label("n"))
        .where(LedgerEntry.kind.in_(("capture", "release")))
        .group_by(LedgerEntry.hold_id)
        .subquery()
    )
    with db.read() as s:
        for acc, credits, total in s.execute(
            select(Account.id, Account.credits, func.coalesce(sums.c.total, 0)).outerjoin(
                sums, sums.c.account_id == Account.id
            )
        ):
            if credits != int(total):
                problems.append(f"account #{acc}: balance {credits} != ledger sum {int(total)}")
            if credits < 0:
                problems.append(f"account #{acc}: negative balance {credits}")
        for hold_id, status, n in s.execute(
            select(Hold.id, Hold.status, func.coalesce(settle_rows.c.n, 0)).outerjoin(
                settle_rows, settle_rows.c.hold_id == Hold.id
            )
        ):
            expected = 0 if status == "held" else 1
            if int(n) != expected:
                problems.append(f"hold #{hold_id} ({status}) has {int(n)} settling ledger rows")
    return problems
