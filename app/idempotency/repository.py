"""SQL of idempotency records."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from app.idempotency.models import IdempotencyRecord


class IdempotencyRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, tenant: str, route: str, key: str) -> IdempotencyRecord | None:
        return await self.session.get(IdempotencyRecord, (tenant, route, key))

    async def put(self, tenant: str, route: str, key: str, request_hash: str, status_code: int, response: dict) -> None:
        record = IdempotencyRecord(tenant=tenant, route=route, key=key, request_hash=request_hash)
        record.status_code, record.response = status_code, response
        self.session.add(record)
        await self.session.flush()
