"""jobs.cost: money spent, from the backends' prices

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 15:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cost", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("jobs", "cost")
