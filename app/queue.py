"""The job queue behind a small interface: SAQ on Redis, or an in-process asyncio queue (embedded mode).

The queue only carries "run job X" messages. Postgres stays the source of truth: a message may be
lost (Redis flushed) or duplicated (reconciler and SAQ's own sweep both retry); the lease in the
job row makes a duplicate harmless and the reconciler replaces a lost one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from app.settings import QueueSettings

log = logging.getLogger(__name__)

# Called with the job id and a heartbeat callback the runner awaits periodically.
JobHandler = Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]

TASK_NAME = "run_job"
NEVER_S = 10 * 365 * 24 * 3600


class JobQueue(Protocol):
    async def enqueue(self, job_id: str) -> str:
        """Send a message for `job_id`; returns the message key."""

    async def message_state(self, queue_key: str) -> str | None:
        """ "waiting" (not picked up yet), "active" (a worker took it), or None (gone or finished)."""

    async def ping(self) -> None: ...

    async def active_members(self, group: str, member: str, active: bool, window_s: float) -> int:
        """Mark `member` of `group` active now (or not), and count the members active within the last `window_s`
        seconds, this one included when active. Workers use it to share a backend's concurrency."""

    async def run_consumer(self, handler: JobHandler, concurrency: int) -> None:
        """Consume messages until cancelled."""

    async def aclose(self) -> None: ...


def new_queue_key(job_id: str) -> str:
    # A fresh key per message: SAQ would silently drop a re-enqueue under an existing key.
    return f"{job_id}:{uuid.uuid4().hex[:12]}"


class SaqJobQueue:
    def __init__(self, redis_url: str, settings: QueueSettings) -> None:
        from saq import Queue

        self.settings = settings
        self.queue = Queue.from_url(redis_url, name=settings.name)
        self._connected = False

    async def _connect(self) -> None:
        if not self._connected:
            await self.queue.connect()
            self._connected = True

    async def enqueue(self, job_id: str) -> str:
        await self._connect()
        key = new_queue_key(job_id)
        # SAQ's defaults suit short web jobs (10 s timeout, no heartbeat, one try); ours run for hours:
        # no timeout, a heartbeat (fed by the runner's background task), retries, long ttl.
        await self.queue.enqueue(
            TASK_NAME,
            key=key,
            job_id=job_id,
            timeout=0,
            heartbeat=max(1, int(self.settings.lease_seconds)),
            retries=self.settings.retries,
            retry_delay=1.0,
            retry_backoff=30.0,
            ttl=24 * 3600,
        )
        return key

    async def message_state(self, queue_key: str) -> str | None:
        from saq.job import Status

        await self._connect()
        job = await self.queue.job(queue_key)
        if job is None:
            return None
        if job.status in (Status.NEW, Status.QUEUED):
            return "waiting"
        return "active" if job.status == Status.ACTIVE else None

    async def ping(self) -> None:
        await self._connect()
        await self.queue.redis.ping()

    async def message_counts(self) -> dict[str, int]:
        """Messages waiting and being worked on (for /metrics): two Redis list lengths."""
        await self._connect()
        return {"queued": await self.queue.count("queued"), "active": await self.queue.count("active")}

    async def active_members(self, group: str, member: str, active: bool, window_s: float) -> int:
        await self._connect()
        key = f"{self.settings.name}:active:{group}"
        now = time.time()
        async with self.queue.redis.pipeline(transaction=True) as pipe:
            if active:
                pipe.zadd(key, {member: now})
            else:
                pipe.zrem(key, member)
            pipe.zremrangebyscore(key, 0, now - window_s)
            pipe.zcard(key)
            pipe.expire(key, max(60, int(window_s * 10)))
            results = await pipe.execute()
        return int(results[2])

    async def run_consumer(self, handler: JobHandler, concurrency: int) -> None:
        from saq import Worker

        await self._connect()

        async def run_job(ctx: dict, *, job_id: str) -> None:
            saq_job = ctx["job"]

            async def heartbeat() -> None:
                await saq_job.update()

            await handler(job_id, heartbeat)

        worker = Worker(
            self.queue,
            functions=[(TASK_NAME, run_job)],
            concurrency=concurrency,
            # No SAQ-initiated aborts: SAQ's sweep can catch a healthy job between being moved to the active
            # list and being marked active (and a job whose heartbeat lapsed in a database outage), abort it and
            # run it again. Cancellation goes through the job row, and the lease makes a duplicate message
            # harmless, so a sweep may re-queue a message but never stops a running attempt.
            timers={"sweep": max(1, int(self.settings.reconcile_seconds)), "abort": NEVER_S},
            # The runner hands a job back (lease released) as soon as it is cancelled; no need to wait long.
            shutdown_grace_period_s=1,
        )
        try:
            await worker.start()
        finally:
            await worker.stop()

    async def aclose(self) -> None:
        if self._connected:
            await self.queue.disconnect()
            self._connected = False


class InProcessJobQueue:
    """Embedded mode: messages live in this process only; the reconciler restores them after a restart."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._waiting: set[str] = set()
        self._active: set[str] = set()

    async def enqueue(self, job_id: str) -> str:
        key = new_queue_key(job_id)
        self._waiting.add(key)
        await self._queue.put((key, job_id))
        return key

    async def message_state(self, queue_key: str) -> str | None:
        if queue_key in self._waiting:
            return "waiting"
        return "active" if queue_key in self._active else None

    async def ping(self) -> None:
        return None

    async def active_members(self, group: str, member: str, active: bool, window_s: float) -> int:
        return 1 if active else 0  # one process: nobody to share with

    async def run_consumer(self, handler: JobHandler, concurrency: int) -> None:
        async def noop_heartbeat() -> None:
            return None

        async def consume() -> None:
            while True:
                key, job_id = await self._queue.get()
                self._waiting.discard(key)
                self._active.add(key)
                try:
                    await handler(job_id, noop_heartbeat)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("job %s crashed in the in-process queue", job_id)
                finally:
                    self._active.discard(key)

        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(consume())

    async def aclose(self) -> None:
        return None
