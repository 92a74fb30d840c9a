"""Write-behind store for the evaluation cache and per-job usage.

Each answered request is submitted at once and written by a background task in small transactions,
so a worker killed mid-step has already stored (nearly) every answer it got: the next attempt finds
them in the cache instead of calling the model again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from app.db import Database
from app.jobs.repository import JobRepository
from app.llm.cache_repository import CacheRepository
from app.llm.usage import Usage

log = logging.getLogger(__name__)


class DurableCacheStore:
    def __init__(self, db: Database, job_id: str | None) -> None:
        self.db = db
        self.job_id = job_id
        self._rows: list[tuple[str, str, dict]] = []
        self._usage = Usage()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._closed = False

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        async with self.db.transaction() as session:
            return await CacheRepository(session).get_many(keys)

    def submit(self, key: str | None, model_id: str, value: dict, usage: Usage) -> None:
        if key is not None:
            self._rows.append((key, model_id, value))
        self._usage.add(usage)
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._writer(), name="cache-writer")

    async def flush(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # surface a writer crash
        await self._idle.wait()

    async def aclose(self) -> None:
        await self.flush()
        self._closed = True
        if self._task is not None:
            self._task.cancel()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            rows, usage = self._rows, self._usage
            self._rows, self._usage = [], Usage()
            if rows or usage != Usage():
                await self._write(rows, usage)
            if not self._rows and self._usage == Usage():
                self._idle.set()

    async def _write(self, rows, usage: Usage) -> None:
        for attempt in range(5):
            try:
                async with self.db.transaction() as session:
                    await CacheRepository(session).put_many(rows)
                    if self.job_id is not None and usage != Usage():
                        await JobRepository(session).charge_usage(self.job_id, usage)
                return
            except Exception:  # the database may be restarting: retry, then give up loudly
                if attempt == 4:
                    raise
                log.warning("cache write failed, retrying", exc_info=True)
                await asyncio.sleep(0.2 * 2**attempt)
