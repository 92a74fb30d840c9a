"""Fixed-window counters shared by every API process (Redis), or kept in the process (embedded mode)."""

from __future__ import annotations

import logging
import math
import time
from typing import Protocol

log = logging.getLogger(__name__)


class WindowCounters(Protocol):
    async def hit(self, name: str, window_s: float) -> tuple[int, float]:
        """Count one event under `name` in the current window of `window_s` seconds; returns the window's count
        so far (this event included) and the seconds until the window ends."""

    async def aclose(self) -> None: ...


def _window(window_s: float) -> tuple[int, float]:
    now = time.time()
    index = math.floor(now / window_s)
    return index, (index + 1) * window_s - now


class RedisWindowCounters:
    def __init__(self, redis_url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.prefix = prefix

    async def hit(self, name: str, window_s: float) -> tuple[int, float]:
        index, left = _window(window_s)
        key = f"{self.prefix}:{name}:{index}"
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.incr(key)
                pipe.expire(key, math.ceil(window_s) + 1)
                count, _ = await pipe.execute()
        except Exception as exc:  # Redis down: limits fail open rather than take the API down with them
            log.warning("rate-limit counters unavailable (%s); request allowed", type(exc).__name__)
            return 0, left
        return int(count), left

    async def aclose(self) -> None:
        await self.redis.aclose()


class MemoryWindowCounters:
    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int]] = {}

    async def hit(self, name: str, window_s: float) -> tuple[int, float]:
        index, left = _window(window_s)
        seen_index, count = self._counts.get(name, (index, 0))
        count = count + 1 if seen_index == index else 1
        self._counts[name] = (index, count)
        return count, left

    async def aclose(self) -> None:
        self._counts.clear()
