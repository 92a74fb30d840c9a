"""`python -m workers`: one worker process (SAQ on Redis, Postgres, configured backends)."""

from __future__ import annotations

import asyncio
import logging

from app.db import Database
from app.llm.registry import BackendRegistry
from app.queue import SaqJobQueue
from app.settings import Settings
from workers.service import run_worker


async def main(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port)
    db = Database(settings.database_url)
    queue = SaqJobQueue(settings.redis_url, settings.queue)
    registry = BackendRegistry(settings)
    try:
        await run_worker(settings, db, queue, registry)
    finally:
        await queue.aclose()
        await registry.aclose()
        await db.dispose()


if __name__ == "__main__":
    asyncio.run(main())
