"""SQL of studies."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.pagination import newest_first
from app.studies.models import Study


class StudyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, study: Study) -> Study:
        self.session.add(study)
        await self.session.flush()
        return study

    async def get(self, study_id: str, tenant: str) -> Study | None:
        query = sa.select(Study).where(Study.id == study_id, Study.tenant == tenant)
        return (await self.session.execute(query)).scalar_one_or_none()

    async def list(self, *, tenant: str | None, limit: int, cursor: str | None) -> tuple[list[Study], str | None]:
        """`tenant` None: every tenant's studies."""
        query = sa.select(Study)
        if tenant is not None:
            query = query.where(Study.tenant == tenant)
        return await newest_first(self.session, query, Study, limit=limit, cursor=cursor)

    async def request_cancel(self, study_id: str) -> None:
        await self.session.execute(sa.update(Study).where(Study.id == study_id).values(cancel_requested=True))
