"""jobs.phase: what a running job is doing now (initial scoring, a search step, test scoring) and how far it got

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 17:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("phase", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "phase")
