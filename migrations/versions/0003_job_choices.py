"""jobs.choices: the chat.completion choices of a result that is more than text

Tool calls, refusals, logprobs or n > 1 choices of a batch item, so its output line
carries them exactly; NULL when the answer is plain text (jobs.output has it).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("choices", sa.JSON(), nullable=True))


def downgrade():
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_column("choices")
