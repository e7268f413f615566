"""batches.finalizer: the claim lease of the process finalizing the batch

Set when a batch moves to `finalizing` (the holder name of a claim lease, as jobs.worker
is for a running item) and cleared when the finalizer gives the batch back. The sweeper
takes over a `finalizing` batch whose holder's lease lapsed, instead of waiting minutes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("finalizer", sa.String(200), nullable=True))


def downgrade():
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("finalizer")
