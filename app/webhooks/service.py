"""Checking a job's webhook at submission, and sending deliveries (a loop in every worker process)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from datetime import timedelta

import httpx

from app.db import Database, utcnow
from app.errors import InvalidPayload
from app.settings import WebhookSettings
from app.webhooks.destinations import DestinationRefused, check_addresses, check_allowed
from app.webhooks.models import WebhookDelivery
from app.webhooks.repository import WebhookRepository
from app.webhooks.signing import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

BATCH = 20
IDLE_POLL_S = 1.0


async def resolve_webhook(requested: dict | None, tenant: str, settings: WebhookSettings) -> dict | None:
    """The job's webhook (its own, else its tenant's default), checked against the allow-list and the address
    rules; a refusal is a 422 at `webhook.url` naming the setting."""
    target = requested
    if target is None and tenant in settings.tenant_defaults:
        target = settings.tenant_defaults[tenant].model_dump()
    if target is None:
        return None
    if not settings.secret:
        raise InvalidPayload(["webhook"], "webhooks are off: the operator has not set webhooks.secret")
    try:
        check_allowed(target["url"], settings.allowed_destinations)
        await check_addresses(target["url"], settings.allow_private_addresses)
    except DestinationRefused as exc:
        raise InvalidPayload(["webhook", "url"], str(exc), allowed=settings.allowed_destinations) from exc
    return target


def retry_at(attempts: int, settings: WebhookSettings):
    """When to try again after `attempts` failed attempts (None: give up); exponential with jitter."""
    if attempts >= settings.max_attempts:
        return None
    delay = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** (attempts - 1))
    return utcnow() + timedelta(seconds=random.uniform(delay / 2, delay))


async def deliver(
    http: httpx.AsyncClient, delivery: WebhookDelivery, settings: WebhookSettings
) -> tuple[bool, int | None, str | None]:
    body = json.dumps(delivery.payload, separators=(",", ":")).encode()
    headers = {
        "content-type": "application/json",
        SIGNATURE_HEADER: sign(settings.secret or "", body),
        "Promptopt-Event": delivery.event,
        "Promptopt-Delivery": str(delivery.id),
    }
    try:
        check_allowed(delivery.url, settings.allowed_destinations)  # the settings may have changed since
        await check_addresses(delivery.url, settings.allow_private_addresses)
        response = await http.post(delivery.url, content=body, headers=headers)
    except DestinationRefused as exc:
        return False, None, f"refused: {exc}"
    except httpx.HTTPError as exc:
        return False, None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= response.status_code < 300:
        return True, response.status_code, None
    return False, response.status_code, f"HTTP {response.status_code}"


async def deliver_due(db: Database, http: httpx.AsyncClient, settings: WebhookSettings) -> int:
    """Send the deliveries that are due; returns how many were attempted."""
    async with db.transaction() as session:
        due = await WebhookRepository(session).claim_due(BATCH, hold_seconds=settings.timeout_seconds * 3)
        claimed = [(d.id, d.event, d.url, d.payload, d.attempts) for d in due]
    if not claimed:
        return 0

    async def attempt(delivery_id, event, url, payload, attempts) -> None:
        delivery = WebhookDelivery(id=delivery_id, event=event, url=url, payload=payload)
        delivered, status_code, error = await deliver(http, delivery, settings)
        later = None if delivered else retry_at(attempts, settings)
        if not delivered:
            log.warning("webhook %s of job delivery %s failed (attempt %d): %s", url, delivery_id, attempts, error)
        async with db.transaction() as session:
            await WebhookRepository(session).record(
                delivery_id, delivered=delivered, status_code=status_code, error=error, retry_at=later
            )

    await asyncio.gather(*(attempt(*row) for row in claimed))
    return len(claimed)


async def run_webhook_dispatcher(db: Database, settings: WebhookSettings) -> None:
    """Send due deliveries until cancelled (every worker process runs one; rows are claimed with SKIP LOCKED)."""
    async with httpx.AsyncClient(timeout=settings.timeout_seconds, follow_redirects=False) as http:
        while True:
            try:
                sent = await deliver_due(db, http, settings)
            except Exception:  # the database may be down: try again later
                log.warning("webhook dispatcher: pass failed", exc_info=True)
                sent = 0
            if sent < BATCH:
                await asyncio.sleep(IDLE_POLL_S)
