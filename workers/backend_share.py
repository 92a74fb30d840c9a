"""One concurrency limit per HTTP backend across all workers: each worker process takes an equal share.

Every `interval_s` a worker marks itself active on each backend it has requests on (a Redis sorted set, through
the queue) and counts the workers active on it within a few intervals; its share of the backend's
`max_concurrency` is that limit divided by the count (itself included). N busy workers therefore keep about
`max_concurrency` sequences at the server between them, and a worker alone gets all of it. Inside its share a
backend may go lower still when the server's queue says so (see `app.llm.inflight.QueueFeedback`).
"""

from __future__ import annotations

import asyncio
import logging
import math

from app.llm.registry import BackendRegistry
from app.queue import JobQueue

log = logging.getLogger(__name__)

SHARE_INTERVAL_S = 2.0


async def share_backends(
    queue: JobQueue, registry: BackendRegistry, worker_id: str, interval_s: float = SHARE_INTERVAL_S
) -> None:
    """Runs until cancelled; a Redis hiccup leaves the shares as they were."""
    while True:
        for name, backend in registry.shared_backends():
            busy = backend.in_flight > 0
            try:
                active = await queue.active_members(f"backend:{name}", worker_id, busy, 3 * interval_s)
            except Exception as exc:  # the queue's Redis is down: keep the last share
                log.debug("backend share for %s not updated: %s", name, exc)
                continue
            others = active - (1 if busy else 0)
            share = math.ceil(backend.settings.max_concurrency / (others + 1))
            if share != backend.share:
                log.info("backend %s: %d other worker(s) active; this worker's share is %d", name, others, share)
            backend.set_share(share)
        await asyncio.sleep(interval_s)
