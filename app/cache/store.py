"""Write-behind store for the evaluation cache, and the usage each answer cost.

Each answered request is submitted at once and written by a background task in small transactions,
so a worker killed mid-step has already stored (nearly) every answer it got: the next attempt finds
them in the cache instead of calling the model again. The usage of the answers in one transaction is
charged in that same transaction through `charge`, so an answer is stored and paid for together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app.cache.repository import CacheRepository
from app.db import Database
from app.usage import Usage

log = logging.getLogger(__name__)

# Adds usage to whoever pays for it, inside the cache write's transaction.
ChargeUsage = Callable[[AsyncSession, Usage], Awaitable[None]]


class CacheStore(Protocol):
    """Durable side of the evaluation cache (Postgres or SQLite), shared by every worker and job."""

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]: ...

    def submit(self, key: str | None, model_id: str, value: dict, usage: Usage) -> None:
        """Queue one answer (key None: not cacheable) and its usage; written in the background, at once."""

    async def flush(self) -> None:
        """Return once everything submitted so far is durable."""


class DurableCacheStore:
    def __init__(self, db: Database, charge: ChargeUsage | None = None) -> None:
        self.db = db
        self.charge = charge
        self._rows: list[tuple[str, str, dict]] = []
        self._usage = Usage()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None

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
                    if self.charge is not None and usage != Usage():
                        await self.charge(session, usage)
                return
            except Exception:  # the database may be restarting: retry, then give up loudly
                if attempt == 4:
                    raise
                log.warning("cache write failed, retrying", exc_info=True)
                await asyncio.sleep(0.2 * 2**attempt)
