"""Re-enqueues jobs whose queue message is gone: queued with no live message (Redis flushed, crash
between commit and enqueue) or running with an expired lease (worker died)."""

from __future__ import annotations

import asyncio
import logging

from app.db import Database
from app.jobs.models import JobStatus
from app.jobs.repository import JobRepository
from app.queue import JobQueue

log = logging.getLogger(__name__)


async def reconcile_once(db: Database, queue: JobQueue, *, queued_grace_seconds: float) -> list[str]:
    async with db.transaction() as session:
        candidates = await JobRepository(session).reconcilable(queued_grace_seconds=queued_grace_seconds)
        stale = [(job.id, job.status, job.queue_key) for job in candidates]
    requeued = []
    for job_id, status, queue_key in stale:
        state = await queue.message_state(queue_key) if queue_key else None
        # A queued job whose message is waiting or being picked up is fine. A running job with a dead
        # lease still shows its dead worker's message as active: only a waiting one means we already
        # re-enqueued it.
        if state == "waiting" or (status == JobStatus.QUEUED and state == "active"):
            continue
        key = await queue.enqueue(job_id)
        async with db.transaction() as session:
            await JobRepository(session).set_queue_key(job_id, key)
        log.info("reconciler: re-enqueued %s job %s", status, job_id)
        requeued.append(job_id)
    return requeued


async def run_reconciler(db: Database, queue: JobQueue, *, interval: float, queued_grace_seconds: float) -> None:
    while True:
        try:
            await reconcile_once(db, queue, queued_grace_seconds=queued_grace_seconds)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("reconciler pass failed", exc_info=True)
        await asyncio.sleep(interval)
