"""Write-behind store for the evaluation cache, and the usage each answer cost.

Each answered request is submitted at once and written by a background task in small transactions,
so a worker killed mid-step has already stored (nearly) every answer it got: the next attempt finds
them in the cache instead of calling the model again. The usage of the answers in one transaction is
charged in that same transaction through `charge`, so an answer is stored and paid for together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app.cache.repository import CacheRepository
from app.db import Database, is_connection_error
from app.usage import Usage

log = logging.getLogger(__name__)

# Marker rows in the cache table (never a cache key: those are sha256 hex digests).
_MARKER_PREFIX = "write:"

# Adds usage to whoever pays for it, inside the cache write's transaction.
ChargeUsage = Callable[[AsyncSession, Usage], Awaitable[None]]


class CacheStore(Protocol):
    """Durable side of the evaluation cache (Postgres or SQLite), shared by every worker and job."""

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]: ...

    def submit(self, key: str | None, model_id: str, value: dict, usage: Usage) -> None:
        """Queue one answer (key None: not cacheable) and its usage; written in the background, at once."""

    async def flush(self) -> None:
        """Return once everything submitted so far is durable."""


class CacheWriteFailed(RuntimeError):
    """Answers could not be stored (the database is unreachable) for longer than the store waits."""


class DurableCacheStore:
    """`outage_seconds`: how long `flush` waits through a database outage before it raises `CacheWriteFailed`.
    The writer itself never gives up: what it could not write stays queued and is written once the database is
    back (each answer stored and charged once), even after a flush has raised."""

    def __init__(
        self,
        db: Database,
        charge: ChargeUsage | None = None,
        *,
        outage_seconds: float = 180.0,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.charge = charge
        self.outage_seconds = outage_seconds
        self.on_write = on_write  # told after each durable write (progress, for the stall watchdog)
        self._rows: list[tuple[str, str, dict]] = []
        self._usage = Usage()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task | None = None
        self._failing_since: float | None = None
        self._retry_now = asyncio.Event()  # a flush cuts the writer's backoff short
        self._unconfirmed: tuple[list, Usage, str] | None = None  # a write whose commit is in doubt
        self._last_marker: str | None = None

    async def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        """The stored answers among `keys`; none while the database is unreachable (a lookup is only a shortcut:
        the job goes on asking the model, and its answers wait in the write queue until the database is back)."""
        try:
            async with self.db.transaction() as session:
                return await CacheRepository(session).get_many(keys)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            log.warning("cache lookup skipped (database unreachable): %s", type(exc).__name__)
            return {}

    def submit(self, key: str | None, model_id: str, value: dict, usage: Usage) -> None:
        if key is not None:
            self._rows.append((key, model_id, value))
        self._usage.add(usage)
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._writer(), name="cache-writer")

    async def flush(self) -> None:
        if self._task is not None and self._task.done() and not self._task.cancelled():
            self._task.result()  # surface a writer crash (a bug: the writer catches what it expects)
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._failing_since is not None:
            self._retry_now.set()  # try again now rather than after the writer's backoff
        while not self._idle.is_set():
            if loop.time() - started > self.outage_seconds:
                raise CacheWriteFailed(f"answers not stored within {self.outage_seconds:g}s: the database is down")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=1.0)

    async def aclose(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.2
        while True:
            await self._wake.wait()
            self._wake.clear()
            retry = self._unconfirmed is not None
            if not retry:
                rows, usage = self._rows, self._usage
                self._rows, self._usage = [], Usage()
                batch = (rows, usage, f"{_MARKER_PREFIX}{uuid.uuid4().hex}") if rows or usage != Usage() else None
            else:
                batch, self._unconfirmed = self._unconfirmed, None
            if batch is not None:
                try:
                    await self._write(*batch, retry=retry)
                except Exception as exc:
                    if not is_connection_error(exc):
                        raise
                    # The commit may or may not have happened: the batch is tried again as it is, with its marker,
                    # and dropped if the marker shows it was stored (and charged) after all.
                    self._unconfirmed = batch
                    if self._failing_since is None:
                        self._failing_since = loop.time()
                    log.warning("cache write failed (database unreachable); retrying in %.1fs", delay)
                    self._retry_now.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._retry_now.wait(), timeout=delay)
                    delay = min(delay * 2, 5.0)
                    self._wake.set()
                    continue
                self._failing_since, delay = None, 0.2
                if self.on_write is not None:
                    self.on_write()
                if self._rows or self._usage != Usage():
                    self._wake.set()
            if self._unconfirmed is None and not self._rows and self._usage == Usage():
                self._idle.set()

    async def _write(self, rows, usage: Usage, marker: str, *, retry: bool = False) -> None:
        """Rows and the usage they cost in one transaction, with a marker row that says it committed (kept until
        the next write, which removes it): a write whose commit answer was lost is not charged twice."""
        async with self.db.transaction() as session:
            repo = CacheRepository(session)
            if retry and await repo.get_many([marker]):
                self._last_marker = marker
                return  # the earlier try committed; its answer was lost on the way back
            await repo.put_many([*rows, (marker, "", {})])
            if self.charge is not None and usage != Usage():
                await self.charge(session, usage)
            if self._last_marker is not None:
                await repo.delete([self._last_marker])
        self._last_marker = marker
