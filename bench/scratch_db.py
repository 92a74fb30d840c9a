"""A migrated Postgres database of its own for one benchmark run, dropped afterwards."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.asynccontextmanager
async def scratch_database(prefix: str, admin_url: str = ADMIN_URL) -> AsyncIterator[str]:
    """Yields the asyncpg SQLAlchemy URL of a fresh, migrated database named `<prefix>_<random>`."""
    from app.migrate import upgrade_async

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + name
    try:
        await upgrade_async(url)
        yield url
    finally:
        admin = await asyncpg.connect(admin_url)
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
