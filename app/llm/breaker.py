"""A circuit breaker per backend and process: while a backend is down, jobs wait for it instead of failing.

The first transient failure (unreachable, 5xx/429 after the per-request retries) opens the breaker. While it is
open no job sends to that backend: each waits until a probe (the backend's cheap `health` call, every
`probe_interval` seconds) succeeds and closes it, then re-sends what was not answered. A wait longer than
`max_wait` raises `BackendUnavailable`, which ends the job's attempt; the job engine retries it later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.llm.port import BackendUnavailable
from app.metrics import BACKEND_TRIPS, BACKEND_UP

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BreakerState:
    state: str  # "closed" | "open"
    since: float | None  # wall-clock time the breaker opened (None when closed)
    last_error: str | None
    trips: int

    def public(self) -> dict:
        return {"state": self.state, "since": self.since, "last_error": self.last_error, "trips": self.trips}


class CircuitBreaker:
    def __init__(self, name: str, probe: Probe | None, *, probe_interval: float = 1.0, max_wait: float = 300.0) -> None:
        self.name = name
        self.probe = probe
        self.probe_interval = probe_interval
        self.max_wait = max_wait
        self.trips = 0
        self.last_error: str | None = None
        self._opened_wall: float | None = None
        self._opened_mono: float | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        self._prober: asyncio.Task | None = None
        BACKEND_UP.labels(backend=name).set(1)

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    def snapshot(self) -> BreakerState:
        return BreakerState("open" if self.is_open else "closed", self._opened_wall, self.last_error, self.trips)

    def trip(self, error: BaseException) -> bool:
        """Open the breaker (a transient failure was seen). True if this call opened it."""
        self.last_error = str(error)[:500]
        if self.is_open:
            return False
        self.trips += 1
        self._opened_wall, self._opened_mono = time.time(), time.monotonic()
        self._closed.clear()
        BACKEND_UP.labels(backend=self.name).set(0)
        BACKEND_TRIPS.labels(backend=self.name).inc()
        log.warning("backend %s is down (%s); jobs wait for it", self.name, self.last_error)
        self._prober = asyncio.create_task(self._probe_until_up(), name=f"breaker-{self.name}")
        return True

    def close(self) -> None:
        if self.is_open:
            log.warning("backend %s is back after %.1fs", self.name, time.monotonic() - (self._opened_mono or 0))
        self._opened_wall = self._opened_mono = None
        self._closed.set()
        BACKEND_UP.labels(backend=self.name).set(1)

    async def wait_closed(self) -> None:
        """Return at once while closed; else wait for the probe to close it, at most `max_wait` after it opened."""
        if not self.is_open:
            return
        left = self.max_wait - (time.monotonic() - (self._opened_mono or time.monotonic()))
        try:
            await asyncio.wait_for(self._closed.wait(), timeout=max(0.0, left))
        except TimeoutError:
            raise BackendUnavailable(
                f"backend {self.name!r} unavailable for more than {self.max_wait:g}s: {self.last_error}"
            ) from None

    async def _probe_until_up(self) -> None:
        delay = self.probe_interval
        while self.is_open:
            await asyncio.sleep(delay)
            if self.probe is None:
                self.close()  # no cheap probe: let the next real request be the trial
                return
            try:
                await self.probe()
            except Exception as exc:  # still down
                self.last_error = str(exc)[:500]
                delay = min(delay * 1.5, 10.0)
                continue
            self.close()

    async def aclose(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(BaseException):
                await self._prober
