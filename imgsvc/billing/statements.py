"""The ledger's statements, built once: building a statement costs more than running it on
SQLite. Parameters are named `p_…`: SQLAlchemy would turn a parameter named like a column of
a table the statement updates (also inside a WITH) into one more `SET` of that column.

The steps (`TAKE`, `SETTLE`, …) run one after another in one transaction on either database;
on PostgreSQL a hold and a capture also exist as one statement each (`PG_HOLD`, `PG_CAPTURE`)
and for several calls at once (`PG_HOLDS`, `PG_CAPTURES`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ARRAY,
    DateTime,
    Integer,
    Select,
    String,
    any_,
    bindparam,
    case,
    func,
    insert,
    literal,
    null,
    select,
    true,
    update,
)

from imgsvc.billing.schema import Account, ApiKey, Hold, LedgerEntry, UsageEvent

LEDGER_COLUMNS = [
    "account_id",
    "key_id",
    "hold_id",
    "delta",
    "kind",
    "request_id",
    "price_version",
    "created_at",
]
USAGE_COLUMNS = [
    "account_id",
    "key_id",
    "request_id",
    "operation",
    "model",
    "client_ref",
    "input_width",
    "input_height",
    "output_width",
    "output_height",
    "credits",
    "price_version",
    "duration_ms",
    "job_id",
    "item",
    "created_at",
]

SETTLED = (
    Hold.id,
    Hold.account_id,
    Hold.key_id,
    Hold.amount,
    Hold.request_id,
    Hold.price_version,
    Hold.created_at,
)

# The steps.
_ACCOUNT = bindparam("p_account_id", type_=Integer)
_CREDITS = bindparam("p_credits", type_=Integer)
_MONTH = bindparam("p_month", type_=String)
TAKE = (
    update(Account)
    .where(Account.id == _ACCOUNT, Account.credits >= _CREDITS)
    .values(credits=Account.credits - _CREDITS)
)
CREDIT = update(Account).where(Account.id == _ACCOUNT).values(credits=Account.credits + _CREDITS)
BALANCE = select(Account.credits).where(Account.id == _ACCOUNT)
_spent = case((ApiKey.cap_month == _MONTH, ApiKey.month_spent + _CREDITS), else_=_CREDITS)
CHARGE_CAP = (
    update(ApiKey)
    .where(ApiKey.id == bindparam("p_key_id", type_=Integer), _spent <= ApiKey.monthly_cap)
    .values(month_spent=_spent, cap_month=_MONTH)
)
UNCHARGE_CAP = (
    update(ApiKey)
    .where(ApiKey.id == bindparam("p_key_id", type_=Integer), ApiKey.monthly_cap.is_not(None))
    .where(ApiKey.cap_month == _MONTH)
    .values(
        month_spent=case((ApiKey.month_spent > _CREDITS, ApiKey.month_spent - _CREDITS), else_=0)
    )
)
SETTLE = (
    update(Hold)
    .where(Hold.id == bindparam("p_hold_id", type_=Integer), Hold.status == "held")
    .values(
        status=bindparam("p_status", type_=String), settled_at=bindparam("p_now", type_=DateTime)
    )
    .returning(*SETTLED)
)
EXTEND = (
    update(Hold)
    .where(Hold.id.in_(bindparam("p_hold_ids", expanding=True)), Hold.status == "held")
    .values(expires_at=bindparam("p_expires_at", type_=DateTime))
)
NEW_HOLD = insert(Hold).returning(Hold.id)
NEW_ENTRY = insert(LedgerEntry)
NEW_USAGE = insert(UsageEvent)


# --- PostgreSQL: a hold and a capture as one statement each -----------------------------------
# Every part of a WITH runs exactly once, on one snapshot, in the statement's own transaction:
# all parts happen or none does.


def _pg_holds(many: bool) -> Select[Any]:
    """Take the total of one account's holds if the balance allows (no row: refused, nothing
    written), insert the holds and their ledger rows, return (hold id, request id); the commit
    does not wait for the disk. `many`: the holds' fields come as arrays (`p_key_ids`, …),
    else one hold's (`p_key_id`, …)."""
    now = bindparam("p_now", type_=DateTime)
    total = bindparam("p_total", type_=Integer)

    def each(one: str, of: Any) -> Any:
        if not many:
            return bindparam(one, type_=of)
        return func.unnest(bindparam(f"{one}s", type_=ARRAY(of)), type_=of)

    wanted = select(
        each("p_key_id", Integer).label("key_id"),
        each("p_request_id", String).label("request_id"),
        each("p_amount", Integer).label("amount"),
        each("p_price_version", String).label("price_version"),
        each("p_expires_at", DateTime).label("expires_at"),
    ).cte("wanted")
    taken = (
        update(Account)
        .where(Account.id == bindparam("p_account_id", type_=Integer), Account.credits >= total)
        .values(credits=Account.credits - total)
        .returning(Account.id)
        .cte("taken")
    )
    hold = (
        insert(Hold)
        .from_select(
            [
                "account_id",
                "key_id",
                "request_id",
                "amount",
                "price_version",
                "status",
                "expires_at",
                "created_at",
            ],
            select(
                taken.c.id,
                wanted.c.key_id,
                wanted.c.request_id,
                wanted.c.amount,
                wanted.c.price_version,
                literal("held"),
                wanted.c.expires_at,
                now,
            ).select_from(taken.join(wanted, true())),
        )
        .returning(*SETTLED)
        .cte("hold")
    )
    entry = (
        insert(LedgerEntry)
        .from_select(
            LEDGER_COLUMNS,
            select(
                hold.c.account_id,
                hold.c.key_id,
                hold.c.id,
                -hold.c.amount,
                literal("hold"),
                hold.c.request_id,
                hold.c.price_version,
                now,
            ),
        )
        .cte("entry")
    )
    # Not waiting for the disk, as `Database.connection(durable=False)`: for this statement's
    # own transaction only.
    no_wait = func.set_config("synchronous_commit", "off", true())
    return select(hold.c.id, hold.c.request_id, no_wait).add_cte(taken, hold, entry)


# What a capture sends per call: the hold, the price, and the usage row's own fields.
CAPTURE_FIELDS: dict[str, Any] = {
    "hold_id": Integer,
    "credits": Integer,
    "account_id": Integer,
    "key_id": Integer,
    "request_id": String,
    "operation": String,
    "model": String,
    "client_ref": String,
    "input_width": Integer,
    "input_height": Integer,
    "output_width": Integer,
    "output_height": Integer,
    "price_version": String,
    "duration_ms": Integer,
}


def _pg_captures(many: bool) -> Select[Any]:
    """Settle held holds as captured, give back their unused part (balances and capped keys'
    months), write the captures' ledger rows and the usage rows; return (hold id, charged,
    remaining) for each hold that was still held (the others: no row, nothing written).
    `many`: the fields come as arrays (`p_hold_ids`, …), else one capture's (`p_hold_id`, …).

    Refunds of several accounts in one statement may meet another process's in the opposite
    order (only captures for less than their hold refund): PostgreSQL then cancels one
    statement, whose captures are then done one by one."""
    now = bindparam("p_now", type_=DateTime)

    def each(name: str, of: Any) -> Any:
        if not many:
            return bindparam(f"p_{name}", type_=of)
        return func.unnest(bindparam(f"p_{name}s", type_=ARRAY(of)), type_=of)

    wanted = select(*(each(name, of).label(name) for name, of in CAPTURE_FIELDS.items())).cte(
        "wanted"
    )
    # Found by primary key: the ids as a condition of their own, and "not settled yet" as
    # `settled_at IS NULL` (set with the status in the same UPDATE, never indexed). With
    # `status = 'held'` the planner may scan the status index, which keeps an entry for every
    # hold that ever was held until a vacuum.
    by_id = (
        Hold.id == any_(bindparam("p_hold_ids", type_=ARRAY(Integer)))
        if many
        else Hold.id == bindparam("p_hold_id", type_=Integer)
    )
    settled = (
        update(Hold)
        .where(by_id, Hold.id == wanted.c.hold_id, Hold.settled_at.is_(None))
        .values(status="captured", settled_at=now)
        .returning(
            *SETTLED, func.least(func.greatest(wanted.c.credits, 0), Hold.amount).label("charged")
        )
        .cte("settled")
    )
    unused = settled.c.amount - settled.c.charged
    back = (
        select(settled.c.account_id, func.sum(unused).label("unused"))
        .group_by(settled.c.account_id)
        .having(func.sum(unused) != 0)
        .cte("back")
    )
    refund = (
        update(Account)
        .where(Account.id == back.c.account_id)
        .values(credits=Account.credits + back.c.unused)
        .returning(Account.id, Account.credits)
        .cte("refund")
    )
    month = func.to_char(settled.c.created_at, "YYYY-MM")
    unspent = (
        select(settled.c.key_id, month.label("month"), func.sum(unused).label("unused"))
        .group_by(settled.c.key_id, month)
        .having(func.sum(unused) > 0)
        .cte("unspent")
    )
    uncap = (
        update(ApiKey)
        .where(ApiKey.id == unspent.c.key_id, ApiKey.monthly_cap.is_not(None))
        .where(ApiKey.cap_month == unspent.c.month)
        .values(
            month_spent=case(
                (ApiKey.month_spent > unspent.c.unused, ApiKey.month_spent - unspent.c.unused),
                else_=0,
            )
        )
        .cte("uncap")
    )
    entry = (
        insert(LedgerEntry)
        .from_select(
            LEDGER_COLUMNS,
            select(
                settled.c.account_id,
                settled.c.key_id,
                settled.c.id,
                unused,
                literal("capture"),
                settled.c.request_id,
                settled.c.price_version,
                now,
            ),
        )
        .cte("entry")
    )
    computed = {
        "credits": settled.c.charged,
        "job_id": null(),
        "item": null(),
        "created_at": now,
    }
    usage = (
        insert(UsageEvent)
        .from_select(
            USAGE_COLUMNS,
            select(
                *(computed[c] if c in computed else wanted.c[c] for c in USAGE_COLUMNS)
            ).select_from(settled.join(wanted, wanted.c.hold_id == settled.c.id)),
        )
        .cte("usage")
    )
    remaining = func.coalesce(
        refund.c.credits,
        select(Account.credits).where(Account.id == settled.c.account_id).scalar_subquery(),
    )
    return (
        select(settled.c.id, settled.c.charged, remaining.label("remaining"))
        .select_from(settled.outerjoin(refund, refund.c.id == settled.c.account_id))
        .add_cte(uncap, entry, usage)
    )


PG_HOLDS = _pg_holds(many=True)
PG_HOLD = _pg_holds(many=False)
PG_CAPTURES = _pg_captures(many=True)
PG_CAPTURE = _pg_captures(many=False)
