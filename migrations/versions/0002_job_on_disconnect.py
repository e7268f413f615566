"""jobs.on_disconnect: what a client disconnect does to a stream job

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(
            sa.Column("on_disconnect", sa.String(10), nullable=False, server_default="detach")
        )


def downgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("on_disconnect")
