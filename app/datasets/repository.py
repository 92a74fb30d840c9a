from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.datasets.models import Dataset
from app.jobs.repository import decode_cursor, encode_cursor


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

    async def list(self, *, tenant: str, limit: int, cursor: str | None) -> tuple[list[Dataset], str | None]:
        query = sa.select(Dataset).where(Dataset.tenant == tenant)
        if cursor:
            created, dataset_id = decode_cursor(cursor)
            created_at = datetime.fromisoformat(created)
            query = query.where(
                sa.or_(
                    Dataset.created_at < created_at,
                    sa.and_(Dataset.created_at == created_at, Dataset.id < dataset_id),
                )
            )
        query = query.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit + 1)
        rows = list((await self.session.execute(query)).scalars())
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(rows[-1].created_at.isoformat(), rows[-1].id)
        return rows, next_cursor
