"""SQL of the durable evaluation cache."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from app.cache.models import EvalCacheEntry
from app.db import utcnow


class CacheRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        table = EvalCacheEntry.__table__
        postgres = self.session.bind.dialect.name == "postgresql"
        for start in range(0, len(keys), 1000):
            chunk = list(keys[start : start + 1000])
            # Postgres: one array parameter, so the statement is the same whatever the number of keys (compiled
            # and prepared once), instead of an IN list rendered anew for every batch size.
            match = (
                table.c.key == sa.func.any(sa.bindparam("keys", chunk, type_=ARRAY(sa.String)))
                if postgres
                else (table.c.key.in_(chunk))
            )
            rows = await self.session.execute(sa.select(table.c.key, table.c.value).where(match))
            found.update({key: value for key, value in rows.all()})
        return found

    async def put_many(self, rows: Sequence[tuple[str, str, dict]]) -> None:
        if not rows:
            return
        dialect = self.session.bind.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        now = utcnow()
        values = [
            {"key": key, "model_id": model_id, "value": value, "created_at": now} for key, model_id, value in rows
        ]
        # Two workers may answer the same request; the first answer wins, both are the same anyway. Core
        # executemany on the table: one cached statement, not an ORM bulk insert compiled for every batch.
        statement = insert(EvalCacheEntry.__table__).on_conflict_do_nothing(index_elements=["key"])
        await self.session.execute(statement, values)

    async def delete(self, keys: Sequence[str]) -> None:
        if keys:
            await self.session.execute(sa.delete(EvalCacheEntry.__table__).where(EvalCacheEntry.key.in_(list(keys))))
