"""job store: jobs, items, webhook secrets and deliveries; (job, item) on usage rows

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("operation", sa.String(length=32), nullable=False),
        sa.Column("options", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("canceled", sa.Integer(), nullable=False),
        sa.Column("credits_quoted", sa.Integer(), nullable=False),
        sa.Column("credits_charged", sa.Integer(), nullable=False),
        sa.Column("client_ref", sa.String(length=100), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("webhook_status", sa.String(length=12), nullable=True),
        sa.Column("webhook_next_at", sa.DateTime(), nullable=True),
        sa.Column("webhook_attempts", sa.Integer(), nullable=False),
        sa.Column("result_url", sa.Text(), nullable=False),
        sa.Column("retention_s", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
        ),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_jobs_key_created", "jobs", ["key_id", "created_at"], unique=False)
    op.create_index("ix_jobs_status_expires", "jobs", ["status", "expires_at"], unique=False)
    op.create_index(
        "ix_jobs_webhook_due", "jobs", ["webhook_status", "webhook_next_at"], unique=False
    )
    op.create_table(
        "webhook_secrets",
        sa.Column("key_id", sa.Integer(), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
        ),
        sa.PrimaryKeyConstraint("key_id"),
    )
    op.create_table(
        "job_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("item", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(), nullable=True),
        sa.Column("dispatched_at", sa.DateTime(), nullable=True),
        sa.Column("input_path", sa.String(length=300), nullable=True),
        sa.Column("output_path", sa.String(length=300), nullable=True),
        sa.Column("output_name", sa.String(length=300), nullable=True),
        sa.Column("media_type", sa.String(length=50), nullable=True),
        sa.Column("hold_id", sa.Integer(), nullable=True),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("charged", sa.Integer(), nullable=True),
        sa.Column("input_width", sa.Integer(), nullable=True),
        sa.Column("input_height", sa.Integer(), nullable=True),
        sa.Column("output_width", sa.Integer(), nullable=True),
        sa.Column("output_height", sa.Integer(), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=50), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["hold_id"],
            ["holds.id"],
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "item", name="uq_job_items_job_item"),
    )
    op.create_index(
        "ix_job_items_status_lease", "job_items", ["status", "lease_expires_at"], unique=False
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_deliveries_job", "webhook_deliveries", ["job_id"], unique=False)
    with op.batch_alter_table("usage_events") as batch_op:
        batch_op.add_column(sa.Column("job_id", sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column("item", sa.Integer(), nullable=True))
        batch_op.create_unique_constraint("uq_usage_job_item", ["job_id", "item"])


def downgrade() -> None:
    with op.batch_alter_table("usage_events") as batch_op:
        batch_op.drop_constraint("uq_usage_job_item", type_="unique")
        batch_op.drop_column("item")
        batch_op.drop_column("job_id")
    op.drop_index("ix_webhook_deliveries_job", table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    op.drop_index("ix_job_items_status_lease", table_name="job_items")
    op.drop_table("job_items")
    op.drop_table("webhook_secrets")
    op.drop_index("ix_jobs_webhook_due", table_name="jobs")
    op.drop_index("ix_jobs_status_expires", table_name="jobs")
    op.drop_index("ix_jobs_key_created", table_name="jobs")
    op.drop_table("jobs")
