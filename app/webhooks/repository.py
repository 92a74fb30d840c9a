"""SQL of webhook deliveries."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.webhooks.models import WebhookDelivery


class WebhookRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    def add(self, job_id: str, event: str, url: str, payload: dict) -> None:
        self.session.add(WebhookDelivery(job_id=job_id, event=event, url=url, payload=payload, status="pending"))

    async def claim_due(self, limit: int, hold_seconds: float) -> list[WebhookDelivery]:
        """Pending deliveries that are due, each counted as an attempt and hidden from other workers for
        `hold_seconds` (the request is sent after this transaction commits)."""
        now = utcnow()
        query = (
            sa.select(WebhookDelivery)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = list((await self.session.execute(query)).scalars())
        for row in rows:
            row.attempts += 1
            row.next_attempt_at = now + timedelta(seconds=hold_seconds)
        await self.session.flush()
        return rows

    async def record(
        self,
        delivery_id: int,
        *,
        delivered: bool,
        status_code: int | None,
        error: str | None,
        retry_at: datetime | None,
    ) -> None:
        """The outcome of an attempt: delivered, to be retried at `retry_at`, or (no `retry_at`) failed for good."""
        values: dict = {"last_status_code": status_code, "last_error": error}
        if delivered:
            values |= {"status": "delivered", "delivered_at": utcnow()}
        elif retry_at is not None:
            values |= {"next_attempt_at": retry_at}
        else:
            values |= {"status": "failed"}
        await self.session.execute(sa.update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(values))

    async def of_job(self, job_id: str) -> list[WebhookDelivery]:
        query = sa.select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).order_by(WebhookDelivery.id)
        return list((await self.session.execute(query)).scalars())
