"""jobs.previous_response_id: the response a /v1/responses job continues

Set when a Responses request names `previous_response_id` (the history it carried in is
in the job's messages); the `response` object echoes it. NULL for every other job.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("previous_response_id", sa.String(40), nullable=True))


def downgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("previous_response_id")
