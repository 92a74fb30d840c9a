from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.datasets.models import Dataset, DatasetExample
from app.pagination import newest_first

_EXAMPLES = DatasetExample.__table__


class DatasetRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, dataset: Dataset) -> Dataset:
        self.session.add(dataset)
        await self.session.flush()
        return dataset

    async def add_examples(self, dataset_id: str, start: int, examples: Sequence[tuple[str, str]]) -> None:
        """(input, target) pairs at positions `start`, `start + 1`, ...: one executemany (Core, no ORM objects)."""
        params = [
            {"dataset_id": dataset_id, "position": start + offset, "input": text, "target": target}
            for offset, (text, target) in enumerate(examples)
        ]
        await self.session.execute(_EXAMPLES.insert(), params)

    async def examples(self, dataset_id: str, limit: int | None = None) -> list[dict[str, str]]:
        """The dataset's examples in upload order (the first `limit` of them)."""
        query = (
            sa.select(_EXAMPLES.c.input, _EXAMPLES.c.target)
            .where(_EXAMPLES.c.dataset_id == dataset_id)
            .order_by(_EXAMPLES.c.position)
        )
        if limit is not None:
            query = query.limit(limit)
        return [{"input": text, "target": target} for text, target in await self.session.execute(query)]

    async def get(self, dataset_id: str, tenant: str) -> Dataset | None:
        query = sa.select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant == tenant)
        return (await self.session.execute(query)).scalar_one_or_none()

    async def list(self, *, tenant: str | None, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
        """`tenant` None: every tenant's datasets."""
        query = sa.select(Dataset)
        if tenant is not None:
            query = query.where(Dataset.tenant == tenant)
        return await newest_first(self.session, query, Dataset, limit=limit, cursor=cursor)
