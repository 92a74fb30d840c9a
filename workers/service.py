"""A worker: consumes the queue with the job runner, and runs the reconciler beside it."""

from __future__ import annotations

import asyncio
import os
import socket

from app.cache.flights import Flights, SharedFlights
from app.db import Database
from app.jobs.reconciler import run_reconciler
from app.llm.registry import BackendRegistry
from app.queue import JobQueue
from app.settings import Settings
from app.webhooks.service import run_webhook_dispatcher
from workers.backend_share import share_backends
from workers.runner import JobRunner


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_worker(settings: Settings, db: Database, queue: JobQueue, registry: BackendRegistry) -> None:
    # Single-flight across every worker on the queue's Redis, or within this process.
    flights = (
        SharedFlights(settings.redis_url, f"{settings.queue.name}:flight")
        if settings.queue_backend == "saq"
        else Flights()
    )
    runner = JobRunner(db, registry, settings, worker_id(), flights)
    consumer = asyncio.create_task(queue.run_consumer(runner.run, settings.queue.concurrency))
    sharing = asyncio.create_task(share_backends(queue, registry, runner.worker_id))
    reconciler = asyncio.create_task(
        run_reconciler(
            db, queue, interval=settings.queue.reconcile_seconds, queued_grace_seconds=settings.queue.reconcile_seconds
        )
    )
    webhooks = asyncio.create_task(run_webhook_dispatcher(db, settings.webhooks))
    try:
        # The consumer ends on SIGTERM/SIGINT (SAQ stops gracefully); the worker ends with it.
        await consumer
    finally:
        for task in (reconciler, consumer, sharing, webhooks):
            task.cancel()
        await asyncio.gather(reconciler, consumer, sharing, webhooks, return_exceptions=True)
        await flights.aclose()
