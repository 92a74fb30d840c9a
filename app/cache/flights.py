"""Requests being answered right now, by cache key (single-flight): a job that misses the cache on a request
another job has already sent waits for that answer instead of sending it again.

`Flights` covers the jobs of one process. `SharedFlights` adds every worker on the same Redis: a request is
claimed there (SET NX) before it is sent, the sender publishes the answer under the claim, and the other workers
poll for it. Redis trouble never blocks a job: a claim that cannot be made is this worker's, and a wait that
cannot be polled ends as "send it yourself"."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterable

log = logging.getLogger(__name__)


class Flights:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._futures)

    async def claim(self, keys: Iterable[str]) -> dict[str, asyncio.Future]:
        """Claim `keys` for sending. Returns the ones someone else is sending, each with a future of its answer
        (a dict, or None: the sender gave up without one and the caller sends it after all); the rest are the
        caller's to send, and to end with `answered` or `abandoned`."""
        borrowed = {}
        for key in keys:
            future = self._futures.get(key)
            if future is not None:
                borrowed[key] = future
            else:
                self._futures[key] = asyncio.get_running_loop().create_future()
        return borrowed

    def answered(self, key: str, value: dict) -> None:
        self._end(key, value)

    def abandoned(self, key: str) -> None:
        """The sender has no answer (it failed, was refused or cancelled): those waiting send it themselves."""
        self._end(key, None)

    def _end(self, key: str, value: dict | None) -> None:
        future = self._futures.pop(key, None)
        if future is not None and not future.done():
            future.set_result(value)

    async def aclose(self) -> None:
        for key in list(self._futures):
            self._end(key, None)


PENDING = b"pending:"
# Compare-and-delete: give up only a claim that is still ours.
RELEASE_SCRIPT = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class SharedFlights(Flights):
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        *,
        claim_ttl_s: float = 300.0,
        answer_ttl_s: float = 60.0,
        poll_interval_s: float = 0.05,
    ) -> None:
        import redis.asyncio as aioredis

        super().__init__()
        self.redis = aioredis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.prefix = prefix
        # A claim outlives any request; a worker that dies holding one costs the waiters at most this long.
        self.claim_ttl_ms = int(claim_ttl_s * 1000)
        self.answer_ttl_ms = int(answer_ttl_s * 1000)
        self.poll_interval_s = poll_interval_s
        self.marker = PENDING + uuid.uuid4().hex.encode()
        self._remote: set[str] = set()  # keys another worker is sending, that jobs here wait for
        self._mine: set[str] = set()  # keys this worker claimed in Redis
        self._outbox: list[tuple[str, dict | None]] = []  # answers (or give-ups) to publish
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None

    def _redis_key(self, key: str) -> str:
        return f"{self.prefix}:{key}"

    async def claim(self, keys: Iterable[str]) -> dict[str, asyncio.Future]:
        keys = list(keys)
        borrowed = await super().claim(keys)
        claimed = [k for k in keys if k not in borrowed]
        if not claimed:
            return borrowed
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in claimed:
                    pipe.set(self._redis_key(key), self.marker, nx=True, px=self.claim_ttl_ms)
                won = await pipe.execute()
        except asyncio.CancelledError:
            # The claims may have been made: give them all up, here and in Redis.
            for key in claimed:
                self._mine.add(key)
                self.abandoned(key)
            raise
        except Exception as exc:
            log.warning("shared single-flight unavailable (%s); sending without it", type(exc).__name__)
            return borrowed
        for key, ours in zip(claimed, won, strict=True):
            if ours:
                self._mine.add(key)
            else:  # another worker sends it: wait here, on the local future other jobs here share too
                self._remote.add(key)
                borrowed[key] = self._futures[key]
        if self._remote:
            self._ensure_loop()
        return borrowed

    def answered(self, key: str, value: dict) -> None:
        super().answered(key, value)
        self._publish(key, value)

    def abandoned(self, key: str) -> None:
        super().abandoned(key)
        self._publish(key, None)

    def _publish(self, key: str, value: dict | None) -> None:
        if key in self._mine:
            self._mine.discard(key)
            self._outbox.append((key, value))
            self._ensure_loop()

    def _ensure_loop(self) -> None:
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Publish this worker's answers and poll for the ones its jobs wait for, while there are any."""
        while self._outbox or self._remote:
            self._wake.clear()
            outbox, self._outbox = self._outbox, []
            waiting = sorted(self._remote)
            try:
                if outbox:
                    await self._send_outbox(outbox)
                if waiting:
                    self._settle(waiting, await self.redis.mget([self._redis_key(k) for k in waiting]))
            except Exception as exc:
                log.warning("shared single-flight unavailable (%s); jobs send for themselves", type(exc).__name__)
                for key in waiting:
                    self._remote.discard(key)
                    self._end(key, None)
            if self._remote and not self._outbox:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)

    async def _send_outbox(self, outbox: list[tuple[str, dict | None]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, value in outbox:
                if value is None:
                    pipe.eval(RELEASE_SCRIPT, 1, self._redis_key(key), self.marker)
                else:
                    pipe.set(self._redis_key(key), json.dumps(value), px=self.answer_ttl_ms)
            await pipe.execute()

    def _settle(self, waiting: list[str], found: list[bytes | None]) -> None:
        for key, raw in zip(waiting, found, strict=True):
            if raw is not None and raw.startswith(PENDING):
                continue  # still being answered
            self._remote.discard(key)
            # An answer, or None: the claim was given up or expired, so the waiters send it themselves.
            self._end(key, None if raw is None else json.loads(raw))

    async def aclose(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(BaseException):
                await self._loop_task
        if self._outbox:
            with contextlib.suppress(Exception):
                await self._send_outbox(self._outbox)
        self._remote.clear()
        await super().aclose()
        await self.redis.aclose()
