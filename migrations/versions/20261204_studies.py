"""studies, jobs.study_id / study_arm, per-example test outcomes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 15:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
    )
    op.create_index(op.f("ix_studies_tenant"), "studies", ["tenant"], unique=False)
    op.create_index(op.f("ix_studies_created_at"), "studies", ["created_at"], unique=False)
    op.create_index("ix_studies_created_at_id", "studies", ["created_at", "id"], unique=False)
    op.add_column("jobs", sa.Column("study_id", sa.String(length=36), nullable=True))
    op.add_column("jobs", sa.Column("study_arm", sa.Integer(), nullable=True))
    op.create_index(op.f("ix_jobs_study_id"), "jobs", ["study_id"], unique=False)
    op.add_column("candidate_evaluations", sa.Column("outcomes", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("candidate_evaluations", "outcomes")
    op.drop_index(op.f("ix_jobs_study_id"), table_name="jobs")
    op.drop_column("jobs", "study_arm")
    op.drop_column("jobs", "study_id")
    op.drop_index("ix_studies_created_at_id", table_name="studies")
    op.drop_index(op.f("ix_studies_created_at"), table_name="studies")
    op.drop_index(op.f("ix_studies_tenant"), table_name="studies")
    op.drop_table("studies")
