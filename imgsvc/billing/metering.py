"""Holds: reserve credits before work, capture on success, release on failure or expiry.

A hold is one conditional UPDATE (`credits >= n`, never a read-then-write) plus its ledger row,
in one transaction, so concurrent calls can never overdraw. A hold carries an expiry that the
running call keeps extending; if the process dies, `sweep_expired` releases it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session

from imgsvc.billing.db import Database
from imgsvc.billing.keys import KeyInfo, current_month
from imgsvc.billing.schema import Account, ApiKey, Hold, LedgerEntry, UsageEvent, utcnow
from imgsvc.errors import InsufficientCredits

log = logging.getLogger("imgsvc.billing")


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
    now = utcnow()
    # Not waiting for the disk is safe here: a hold forgotten by a crash returns its credits.
    with db.transaction(durable=False) as s:
        (hold_id,) = reserve_in(
            s,
            key=key,
            amounts=[credits],
            request_ids=[request_id],
            expires_at=now + ttl,
            price_version=price_version,
        )
        return hold_id


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
    credits = sum(amounts)
    taken = s.execute(
        update(Account)
        .where(Account.id == key.account_id, Account.credits >= credits)
        .values(credits=Account.credits - credits)
    )
    if taken.rowcount != 1:  # type: ignore[attr-defined]
        balance = _balance(s, key.account_id)
        what = "this call costs" if len(amounts) == 1 else f"these {len(amounts)} items cost"
        raise InsufficientCredits(
            f"{what} {credits} credits and the account has {balance}; top up and retry",
            extra={"credits_required": credits, "credits_remaining": balance},
        )
    if key.monthly_cap is not None and not _charge_cap(s, key.id, credits, current_month()):
        # Raising inside the transaction rolls the balance update back too.
        raise MonthlyCapReached(
            f"this costs {credits} credits; this key has spent {key.month_spent} of "
            f"its monthly cap of {key.monthly_cap}",
            extra={"credits_required": credits, "monthly_cap": key.monthly_cap},
        )
    holds = [
        Hold(
            account_id=key.account_id,
            key_id=key.id,
            request_id=request_id,
            amount=amount,
            price_version=price_version,
            expires_at=expires_at,
        )
        for amount, request_id in zip(amounts, request_ids, strict=True)
    ]
    s.add_all(holds)
    s.flush()
    s.add_all([_entry(hold, -hold.amount, "hold") for hold in holds])
    return [hold.id for hold in holds]


def _charge_cap(s: Session, key_id: int, credits: int, month: str) -> bool:
    """Add to a capped key's month_spent unless that would pass the cap (one UPDATE)."""
    new_spent = case((ApiKey.cap_month == month, ApiKey.month_spent + credits), else_=credits)
    res = s.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, new_spent <= ApiKey.monthly_cap)
        .values(month_spent=new_spent, cap_month=month)
    )
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def _uncharge_cap(s: Session, hold: Hold, credits: int) -> None:
    """Give back unused credits to a capped key's month (never below zero)."""
    if credits <= 0:
        return
    s.execute(
        update(ApiKey)
        .where(ApiKey.id == hold.key_id, ApiKey.monthly_cap.is_not(None))
        .where(ApiKey.cap_month == current_month(hold.created_at))
        .values(
            month_spent=case((ApiKey.month_spent > credits, ApiKey.month_spent - credits), else_=0)
        )
    )


def _entry(hold: Hold, delta: int, kind: str) -> LedgerEntry:
    return LedgerEntry(**_row(hold, delta, kind))


def _row(hold: Hold, delta: int, kind: str) -> dict[str, object]:
    return {
        "account_id": hold.account_id,
        "key_id": hold.key_id,
        "hold_id": hold.id,
        "delta": delta,
        "kind": kind,
        "request_id": hold.request_id,
        "price_version": hold.price_version,
        "created_at": utcnow(),
    }


def _balance(s: Session, account_id: int) -> int:
    return int(s.scalar(select(Account.credits).where(Account.id == account_id)) or 0)


def _settle(s: Session, hold_id: int, status: str) -> Hold | None:
    """Move a hold out of `held` (one conditional UPDATE); None if it was already settled."""
    return s.scalars(
        update(Hold)
        .where(Hold.id == hold_id, Hold.status == "held")
        .values(status=status, settled_at=utcnow())
        .returning(Hold)
    ).one_or_none()


def _credit(s: Session, account_id: int, credits: int) -> None:
    if credits:
        s.execute(
            update(Account)
            .where(Account.id == account_id)
            .values(credits=Account.credits + credits)
        )


def extend(db: Database, *, hold_ids: list[int], ttl: timedelta) -> None:
    """Push the expiry of running calls' holds forward (their heartbeat), in one UPDATE."""
    with db.transaction(durable=False) as s:
        s.execute(
            update(Hold)
            .where(Hold.id.in_(hold_ids), Hold.status == "held")
            .values(expires_at=utcnow() + ttl)
        )


def release(db: Database, *, hold_id: int) -> bool:
    """Give a hold back (the call failed). False if it was already settled."""
    # Forgetting a release is safe: the hold expires and the sweeper releases it again.
    with db.transaction(durable=False) as s:
        return release_in(s, hold_id=hold_id)


def release_in(s: Session, *, hold_id: int) -> bool:
    """`release` in the caller's transaction."""
    hold = _settle(s, hold_id, "released")
    if hold is None:
        return False
    _credit(s, hold.account_id, hold.amount)
    _uncharge_cap(s, hold, hold.amount)
    s.add(_entry(hold, hold.amount, "release"))
    return True


def capture(
    db: Database, *, hold_id: int, credits: int, key: KeyInfo, request_id: str, usage: UsageRecord
) -> tuple[int, int]:
    """Charge `credits` (at most the hold) and record the usage; return (charged, remaining).

    The unused part of the hold goes back in the same transaction. If the hold had expired and
    was swept meanwhile, the charge is taken again only if the balance allows it (never
    negative); otherwise the call is recorded as free.
    """
    with db.transaction() as s:
        charged = capture_in(
            s,
            hold_id=hold_id,
            credits=credits,
            account_id=key.account_id,
            key_id=key.id,
            request_id=request_id,
            usage=usage,
        )
        return charged, _balance(s, key.account_id)


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
    hold = _settle(s, hold_id, "captured")
    if hold is not None:
        charged = min(max(credits, 0), hold.amount)
        unused = hold.amount - charged
        _credit(s, hold.account_id, unused)
        _uncharge_cap(s, hold, unused)
        s.execute(insert(LedgerEntry).values(**_row(hold, unused, "capture")))
    else:
        charged = _charge_again(s, account_id, key_id, credits, request_id)
    job_id, item = job_item if job_item is not None else (None, None)
    s.execute(
        insert(UsageEvent).values(
            account_id=account_id,
            key_id=key_id,
            request_id=request_id,
            operation=usage.operation,
            model=usage.model,
            client_ref=usage.client_ref,
            input_width=usage.input_size[0],
            input_height=usage.input_size[1],
            output_width=usage.output_size[0],
            output_height=usage.output_size[1],
            credits=charged,
            price_version=usage.price_version,
            duration_ms=usage.duration_ms,
            job_id=job_id,
            item=item,
            created_at=utcnow(),
        )
    )  # a second capture of a (job, item) or request id fails here: IntegrityError
    return charged


def balance(s: Session, account_id: int) -> int:
    """An account's credits, read in the caller's transaction."""
    return _balance(s, account_id)


def _charge_again(s: Session, account_id: int, key_id: int, credits: int, request_id: str) -> int:
    taken = s.execute(
        update(Account)
        .where(Account.id == account_id, Account.credits >= credits)
        .values(credits=Account.credits - credits)
    )
    if taken.rowcount != 1 or credits <= 0:  # type: ignore[attr-defined]
        log.warning("request %s: hold expired and balance too low; not charged", request_id)
        return 0
    s.add(
        LedgerEntry(
            account_id=account_id,
            key_id=key_id,
            delta=-credits,
            kind="charge",
            request_id=request_id,
        )
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
