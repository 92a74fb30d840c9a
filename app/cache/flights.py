"""Requests being answered right now in this process, by cache key (single-flight): a job that misses the cache
on a request another job has already sent waits for that answer instead of sending it again."""

from __future__ import annotations

import asyncio


class Flights:
    def __init__(self) -> None:
        self._futures: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._futures)

    def waiting_for(self, key: str) -> asyncio.Future | None:
        """The answer (a dict, or None: the sender gave up without one) of a request in flight, if any."""
        return self._futures.get(key)

    def start(self, key: str) -> None:
        self._futures[key] = asyncio.get_running_loop().create_future()

    def answered(self, key: str, value: dict) -> None:
        self._end(key, value)

    def abandoned(self, key: str) -> None:
        """The sender has no answer (it failed, was refused or cancelled): those waiting send it themselves."""
        self._end(key, None)

    def _end(self, key: str, value: dict | None) -> None:
        future = self._futures.pop(key, None)
        if future is not None and not future.done():
            future.set_result(value)
