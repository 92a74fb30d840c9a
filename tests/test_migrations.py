"""The Alembic migrations match the models, and carry stored data over, on Postgres and on SQLite."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from app.migrate import alembic_config, upgrade_async
from app.models import Base
from tests.conftest import PG_ADMIN, TEST_DB, TEST_DB_URL


async def _diff(url: str) -> list:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync_conn: compare_metadata(MigrationContext.configure(sync_conn), Base.metadata)
        )
    await engine.dispose()
    return diff


async def test_postgres_schema_matches_models(database_url):
    assert await _diff(database_url) == []


async def test_sqlite_schema_matches_models(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    await upgrade_async(url)
    assert await _diff(url) == []


async def _migrate_examples_both_ways(url: str) -> None:
    """0009 moves datasets.examples (one JSON value) into dataset_examples rows, in order, and back."""
    await upgrade_async(url, "0008")
    examples = [{"input": f'ünï "{i}"\n\\', "target": ("yes", "")[i % 2]} for i in range(12)]
    engine = create_async_engine(url)
    insert = sa.text(
        "INSERT INTO datasets (id, tenant, name, examples, n_examples, created_at) "
        "VALUES (:id, 'default', :id, :examples, :n, CURRENT_TIMESTAMP)"
    )
    async with engine.begin() as conn:
        for dataset_id, some in (("d1", examples), ("d2", examples[:1])):
            await conn.execute(insert, {"id": dataset_id, "examples": json.dumps(some), "n": len(some)})
    await upgrade_async(url)
    rows = sa.text("SELECT dataset_id, position, input, target FROM dataset_examples ORDER BY dataset_id, position")
    async with engine.connect() as conn:
        moved = [tuple(r) for r in await conn.execute(rows)]
    assert moved == [("d1", i, e["input"], e["target"]) for i, e in enumerate(examples)] + [
        ("d2", 0, examples[0]["input"], examples[0]["target"])
    ]
    await asyncio.to_thread(command.downgrade, alembic_config(url), "0008")
    async with engine.connect() as conn:
        back = dict(tuple(r) for r in await conn.execute(sa.text("SELECT id, examples FROM datasets ORDER BY id")))
    await engine.dispose()
    assert {k: json.loads(v) if isinstance(v, str) else v for k, v in back.items()} == {
        "d1": examples,
        "d2": examples[:1],
    }


async def test_dataset_examples_migrate_on_sqlite(tmp_path):
    await _migrate_examples_both_ways(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")


async def test_dataset_examples_migrate_on_postgres():
    name = f"{TEST_DB}_m"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        await _migrate_examples_both_ways(TEST_DB_URL.rsplit("/", 1)[0] + "/" + name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
