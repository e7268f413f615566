"""Executors and cost: provider batches, jobs.executor / provider_batch_id / cost_usd

A batch-mode job runs on Sluice's workers or inside a provider's own batch API
(`provider_batches`, one row per provider batch, its `remote_id` stored so a poller that
dies resumes). Every job records what it cost (`cost_usd`, from its usage, model and
executor); batches record their executor.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-02

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("batch_id", sa.String(40), nullable=True),
        sa.Column("provider", sa.String(60), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("remote_id", sa.String(200), nullable=True),
        sa.Column("remote_status", sa.String(30), nullable=True),
        sa.Column("remote_counts", sa.JSON(), nullable=True),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("polls", sa.Integer(), nullable=False),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name="fk_provider_batches_batch_id_batches",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_provider_batches"),
    )
    op.create_index(
        "ix_provider_batches_status_next_poll_at", "provider_batches", ["status", "next_poll_at"]
    )
    op.create_index("ix_provider_batches_batch_id", "provider_batches", ["batch_id"])
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("executor", sa.String(12), nullable=True))
        batch_op.add_column(sa.Column("provider_batch_id", sa.String(40), nullable=True))
        batch_op.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))
        batch_op.create_index("ix_jobs_executor_status", ["executor", "status"])
        batch_op.create_index("ix_jobs_provider_batch_id", ["provider_batch_id"])
        batch_op.create_index("ix_jobs_cost_usd_finished_at", ["cost_usd", "finished_at"])
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("executor", sa.String(12), nullable=True))


def downgrade():
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("executor")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_cost_usd_finished_at")
        batch_op.drop_index("ix_jobs_provider_batch_id")
        batch_op.drop_index("ix_jobs_executor_status")
        batch_op.drop_column("cost_usd")
        batch_op.drop_column("provider_batch_id")
        batch_op.drop_column("executor")
    op.drop_index("ix_provider_batches_batch_id", table_name="provider_batches")
    op.drop_index("ix_provider_batches_status_next_poll_at", table_name="provider_batches")
    op.drop_table("provider_batches")
