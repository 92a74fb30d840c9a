from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.datasets.models import Dataset
from app.pagination import newest_first


class DatasetRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, dataset: Dataset) -> Dataset:
        self.session.add(dataset)
        await self.session.flush()
        return dataset

    async def get(self, dataset_id: str, tenant: str) -> Dataset | None:
        query = sa.select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant == tenant)
        return (await self.session.execute(query)).scalar_one_or_none()

    async def list(self, *, tenant: str | None, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
        """`tenant` None: every tenant's datasets."""
        query = sa.select(Dataset)
        if tenant is not None:
            query = query.where(Dataset.tenant == tenant)
        return await newest_first(self.session, query, Dataset, limit=limit, cursor=cursor)
