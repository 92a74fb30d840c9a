"""SQL of the durable evaluation cache."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from app.cache.models import EvalCacheEntry


class CacheRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for start in range(0, len(keys), 1000):
            chunk = list(keys[start : start + 1000])
            rows = await self.session.execute(
                sa.select(EvalCacheEntry.key, EvalCacheEntry.value).where(EvalCacheEntry.key.in_(chunk))
            )
            found.update({key: value for key, value in rows.all()})
        return found

    async def put_many(self, rows: Sequence[tuple[str, str, dict]]) -> None:
        if not rows:
            return
        dialect = self.session.bind.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        values = [{"key": key, "model_id": model_id, "value": value} for key, model_id, value in rows]
        # Two workers may answer the same request; the first answer wins, both are the same anyway.
        await self.session.execute(insert(EvalCacheEntry).values(values).on_conflict_do_nothing(index_elements=["key"]))
