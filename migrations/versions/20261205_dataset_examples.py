"""dataset_examples: an uploaded dataset's examples as rows (from the JSON column datasets.examples)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 10:00:00

A row per example lets an upload be inserted, and a dataset read, a bounded chunk at a time; one JSON value had
to be built (and sent, and read back) whole. The examples move over in the database, in their order.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

COPY_IN = {
    "postgresql": """
        INSERT INTO dataset_examples (dataset_id, position, input, target)
        SELECT d.id, e.ordinality - 1, e.value ->> 'input', e.value ->> 'target'
        FROM datasets d CROSS JOIN LATERAL json_array_elements(d.examples) WITH ORDINALITY AS e(value, ordinality)
    """,
    "sqlite": """
        INSERT INTO dataset_examples (dataset_id, position, input, target)
        SELECT d.id, CAST(e.key AS INTEGER), json_extract(e.value, '$.input'), json_extract(e.value, '$.target')
        FROM datasets d, json_each(d.examples) AS e
    """,
}
COPY_OUT = {
    "postgresql": """
        UPDATE datasets SET examples = COALESCE(
            (SELECT json_agg(json_build_object('input', e.input, 'target', e.target) ORDER BY e.position)
             FROM dataset_examples e WHERE e.dataset_id = datasets.id),
            '[]'::json)
    """,
    "sqlite": """
        UPDATE datasets SET examples = (
            SELECT json_group_array(json_object('input', input, 'target', target))
            FROM (SELECT input, target FROM dataset_examples e WHERE e.dataset_id = datasets.id ORDER BY position))
    """,
}


def upgrade() -> None:
    op.create_table(
        "dataset_examples",
        sa.Column("dataset_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("input", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_dataset_examples_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("dataset_id", "position", name=op.f("pk_dataset_examples")),
    )
    op.execute(COPY_IN[op.get_bind().dialect.name])
    # On SQLite batch mode recreates `datasets`; the migration's connection does not enforce foreign keys (no
    # PRAGMA foreign_keys), so dropping the old table does not cascade to the rows just copied.
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_column("examples")


def downgrade() -> None:
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("examples", sa.JSON(), nullable=True))
    op.execute(COPY_OUT[op.get_bind().dialect.name])
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.alter_column("examples", existing_type=sa.JSON(), nullable=False)
    op.drop_table("dataset_examples")
