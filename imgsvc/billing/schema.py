"""Database tables: accounts (balances), keys, holds, the append-only ledger, usage, idempotency.

Migrations live in `imgsvc/billing/migrations` (Alembic); this module is their source of truth.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """Naive UTC (stored the same way on SQLite and PostgreSQL)."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Account(Base):
    """Who pays: one balance in integer credits, shared by the account's keys and sub-keys."""

    __tablename__ = "accounts"
    __table_args__ = (CheckConstraint("credits >= 0", name="credits_never_negative"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    credits: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A secret that acts for an account. Only the SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    parent_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    key_prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[str] = mapped_column(String(500))  # space-separated
    rate_limit: Mapped[str | None] = mapped_column(String(50), default=None)
    monthly_cap: Mapped[int | None] = mapped_column(Integer, default=None)
    cap_month: Mapped[str | None] = mapped_column(String(7), default=None)  # "YYYY-MM"
    month_spent: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Hold(Base):
    """Credits reserved for a call in flight: `held` → `captured` | `released`."""

    __tablename__ = "holds"
    __table_args__ = (Index("ix_holds_status_expires", "status", "expires_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    amount: Mapped[int] = mapped_column(Integer)
    price_version: Mapped[str | None] = mapped_column(String(50), default=None)
    status: Mapped[str] = mapped_column(String(10), default="held")
    expires_at: Mapped[datetime] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    settled_at: Mapped[datetime | None] = mapped_column(default=None)


class LedgerEntry(Base):
    """Every change of an account's credits, append-only.

    kinds: grant, topup (+); hold (−); release (+ the whole hold); capture (+ the unused part of
    the hold, usually 0). For every account `credits == sum(delta)`.
    """

    __tablename__ = "ledger"
    __table_args__ = (Index("ix_ledger_account_created", "account_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), default=None)
    hold_id: Mapped[int | None] = mapped_column(ForeignKey("holds.id"), default=None)
    delta: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    # The price table a hold/capture/release was computed with (None for grants and top-ups).
    price_version: Mapped[str | None] = mapped_column(String(50), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UsageEvent(Base):
    """One successful call and what it was charged, with the price table version used.

    A batch job's item carries its (job, item): unique, so an item is charged at most once
    however often a broker delivers it."""

    __tablename__ = "usage_events"
    __table_args__ = (
        Index("ix_usage_account_created", "account_id", "created_at"),
        Index("ix_usage_key_created", "key_id", "created_at"),
        UniqueConstraint("job_id", "item", name="uq_usage_job_item"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    operation: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(100))
    client_ref: Mapped[str | None] = mapped_column(String(100), default=None)
    input_width: Mapped[int] = mapped_column(Integer)
    input_height: Mapped[int] = mapped_column(Integer)
    output_width: Mapped[int] = mapped_column(Integer)
    output_height: Mapped[int] = mapped_column(Integer)
    credits: Mapped[int] = mapped_column(Integer)
    price_version: Mapped[str] = mapped_column(String(50))
    duration_ms: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    item: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    """The first response to an `Idempotency-Key`, replayed to retries for 24 hours; while its
    request runs, a lease until `expires_at`."""

    __tablename__ = "idempotency"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    idem_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(10))  # running | done
    # The running request's claim: a request whose lease ran out cannot store over a later one.
    claim: Mapped[str | None] = mapped_column(String(32), default=None)
    response_status: Mapped[int | None] = mapped_column(Integer, default=None)
    response_headers: Mapped[str | None] = mapped_column(Text, default=None)  # JSON
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    media_type: Mapped[str | None] = mapped_column(String(100), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
