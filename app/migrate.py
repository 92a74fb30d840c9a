"""Apply Alembic migrations programmatically (`promptopt migrate`, embedded start-up, tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


async def upgrade_async(url: str, revision: str = "head") -> None:
    # Alembic's env.py runs its own event loop; keep it off ours.
    await asyncio.to_thread(upgrade, url, revision)


async def ensure_database(url: str) -> bool:
    """Create the database `url` names if it does not exist (Postgres: from the `postgres` maintenance database;
    SQLite: its directory). Returns whether it was created."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _ensure_sqlite_directory(parsed.database)
    import asyncpg

    name = parsed.database
    maintenance = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    conn = await asyncpg.connect(maintenance, timeout=10)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            return False
        await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
        return True
    finally:
        await conn.close()


def _ensure_sqlite_directory(database: str | None) -> bool:
    if not database or Path(database).exists():
        return False
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    return True
