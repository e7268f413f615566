"""batches.input_hash: a SHA-256 of a document batch's items, for Idempotency-Key replays

A request that reuses a batch's Idempotency-Key with other documents is refused (422)
instead of replaying the first batch; NULL for batches made before this column (their
replays compare the options only) and for OpenAI batches (their input file is compared).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("input_hash", sa.String(64), nullable=True))


def downgrade():
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_column("input_hash")
