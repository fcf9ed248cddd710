"""Job store tables: jobs, their items (status, attempts, lease, files, charge), webhook secrets
and webhook delivery attempts. Same database (and Alembic history) as the ledger, so an item's
success and its charge commit in one transaction."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from imgsvc.billing.schema import Base, utcnow

JOB_STATUSES = ("queued", "running", "succeeded", "partially_failed", "failed", "canceled")
FINISHED = ("succeeded", "partially_failed", "failed", "canceled")
ITEM_OPEN = ("queued", "running")  # an item still to run (or running)


class Job(Base):
    """A batch of items of one operation, with the same options, for one key."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_key_created", "key_id", "created_at"),
        Index("ix_jobs_status_expires", "status", "expires_at"),
        Index("ix_jobs_webhook_due", "webhook_status", "webhook_next_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    operation: Mapped[str] = mapped_column(String(32))
    options: Mapped[str] = mapped_column(Text)  # JSON of the operation's options model
    status: Mapped[str] = mapped_column(String(20), default="queued")  # JOB_STATUSES | expired
    total: Mapped[int] = mapped_column(Integer)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    canceled: Mapped[int] = mapped_column(Integer, default=0)
    credits_quoted: Mapped[int] = mapped_column(Integer, default=0)
    credits_charged: Mapped[int] = mapped_column(Integer, default=0)
    client_ref: Mapped[str | None] = mapped_column(String(100), default=None)
    request_id: Mapped[str] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    webhook_status: Mapped[str | None] = mapped_column(String(12), default=None)
    webhook_next_at: Mapped[datetime | None] = mapped_column(default=None)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0)
    result_url: Mapped[str] = mapped_column(Text)  # absolute URL of the result, for webhooks
    retention_s: Mapped[int] = mapped_column(Integer)  # results kept this long once finished
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)


class JobItem(Base):
    """One input of a job. Claimed under a lease; `succeeded` commits with its capture."""

    __tablename__ = "job_items"
    __table_args__ = (
        UniqueConstraint("job_id", "item", name="uq_job_items_job_item"),
        Index("ix_job_items_status_lease", "status", "lease_expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    item: Mapped[int] = mapped_column(Integer)  # 1-based, in upload order
    name: Mapped[str] = mapped_column(String(300))
    status: Mapped[str] = mapped_column(String(12), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    dispatched_at: Mapped[datetime | None] = mapped_column(default=None)
    input_path: Mapped[str | None] = mapped_column(String(300), default=None)
    output_path: Mapped[str | None] = mapped_column(String(300), default=None)
    output_name: Mapped[str | None] = mapped_column(String(300), default=None)
    media_type: Mapped[str | None] = mapped_column(String(50), default=None)
    hold_id: Mapped[int | None] = mapped_column(ForeignKey("holds.id"), default=None)
    credits: Mapped[int] = mapped_column(Integer, default=0)  # quoted (held)
    charged: Mapped[int | None] = mapped_column(Integer, default=None)
    input_width: Mapped[int | None] = mapped_column(Integer, default=None)
    input_height: Mapped[int | None] = mapped_column(Integer, default=None)
    output_width: Mapped[int | None] = mapped_column(Integer, default=None)
    output_height: Mapped[int | None] = mapped_column(Integer, default=None)
    model: Mapped[str | None] = mapped_column(String(100), default=None)
    model_version: Mapped[str | None] = mapped_column(String(64), default=None)
    error_code: Mapped[str | None] = mapped_column(String(50), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookSecret(Base):
    """The signing secret of a key's webhooks (shown once when made; needed to sign)."""

    __tablename__ = "webhook_secrets"

    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One attempt to deliver a job's webhook."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_job", "job_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(String(200), default=None)
    at: Mapped[datetime] = mapped_column(default=utcnow)
