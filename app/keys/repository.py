"""SQL of API keys."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.keys.models import ApiKey


class ApiKeyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, key: ApiKey) -> ApiKey:
        self.session.add(key)
        await self.session.flush()
        return key

    async def active_by_hash(self, key_hash: str) -> ApiKey | None:
        query = sa.select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None))
        return (await self.session.execute(query)).scalar_one_or_none()

    async def any_active(self) -> bool:
        query = sa.select(sa.exists().where(ApiKey.revoked_at.is_(None)))
        return bool((await self.session.execute(query)).scalar())

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        query = sa.select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        return list((await self.session.execute(query)).scalars())

    async def revoke(self, id_or_prefix: str) -> list[ApiKey]:
        """Revokes the key with this id, or every active key whose prefix is this; returns them."""
        query = sa.select(ApiKey).where(
            sa.or_(ApiKey.id == id_or_prefix, ApiKey.prefix == id_or_prefix), ApiKey.revoked_at.is_(None)
        )
        keys = list((await self.session.execute(query)).scalars())
        now = utcnow()
        for key in keys:
            key.revoked_at = now
        await self.session.flush()
        return keys
