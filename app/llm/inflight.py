"""How many sequences one process keeps in flight at an LLM server, and how that number is chosen.

A continuous-batching server (vLLM) runs up to `max_num_seqs` sequences per step; a client keeps it busy by
having about that many in flight. The limit counts sequences (prompts, or completions for `n` > 1), not HTTP
requests, since one request may carry many prompts. It can change while requests wait (the share of a limit
held with other workers, or the server's own queue says so).
"""

from __future__ import annotations

import asyncio
import collections
import math


class InFlightLimit:
    """A weighted, first-come first-served semaphore whose size can change.

    `acquire(w)` returns once `w` more sequences fit under the limit (a weight above the limit is cut to it, so a
    big request never waits forever); waiters are served strictly in arrival order, so requests go out in the
    order they were issued."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, int(limit))
        self.in_flight = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def waiting(self) -> int:
        return sum(weight for weight, _ in self._waiters)

    def set_limit(self, limit: int) -> None:
        self._limit = max(1, int(limit))
        self._wake()

    async def acquire(self, weight: int) -> int:
        """Take `weight` slots (cut to the limit); returns the weight taken, to pass to `release`."""
        weight = max(1, min(int(weight), self._limit))
        if not self._waiters and self.in_flight + weight <= self._limit:
            self.in_flight += weight
            return weight
        future = asyncio.get_running_loop().create_future()
        entry = (weight, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release(weight)  # granted just as we were cancelled
            else:
                self._waiters.remove(entry)
                self._wake()
            raise
        return weight

    def release(self, weight: int) -> None:
        self.in_flight -= weight
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            weight, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            # Granted whole once nothing else is in flight, even above a limit that shrank while it waited.
            if self.in_flight + weight > self._limit and self.in_flight > 0:
                return
            self._waiters.popleft()
            self.in_flight += weight
            future.set_result(None)


class QueueFeedback:
    """Fits a client's limit to what a continuous-batching server reports of its own queue.

    Requests waiting at the server are good up to a batch or two: the next steps' work is already there, with no
    round trip (a server limited by its token budget per step runs fewer sequences than `max_num_seqs` and queues
    the rest; measured on bench/sim_server, cutting that queue lowered throughput by 5-10%). More than that is
    queueing only: latency, not throughput, and it crowds out other clients, e.g. when `max_concurrency` is set far
    above the server's `--max-num-seqs`. So the limit shrinks by a tenth while more than `slack` times the running
    count waits, and grows by `step` while less than half that waits. It stays between `floor` and `ceiling` (the
    configured limit, or this worker's share of it)."""

    def __init__(self, ceiling: int, *, floor: int = 8, slack: float = 2.0, step: int = 16) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = min(floor, self.ceiling)
        self.slack = slack
        self.step = step
        self.limit = self.ceiling

    def update(self, running: float, waiting: float) -> int:
        if waiting > max(8.0, self.slack * running):
            self.limit = max(self.floor, math.floor(self.limit * 0.9))
        elif waiting <= 0.5 * self.slack * running:
            self.limit = min(self.ceiling, self.limit + self.step)
        self.limit = min(max(self.limit, self.floor), self.ceiling)
        return self.limit

    def set_ceiling(self, ceiling: int) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = min(self.floor, self.ceiling)
        self.limit = min(self.limit, self.ceiling)


def parse_vllm_queue(text: str) -> tuple[float, float] | None:
    """(running, waiting) from a vLLM Prometheus `/metrics` page, summed over models; None if it has neither."""
    running = waiting = 0.0
    seen = False
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            running += _sample_value(line)
            seen = True
        elif line.startswith("vllm:num_requests_waiting"):
            waiting += _sample_value(line)
            seen = True
    return (running, waiting) if seen else None


def _sample_value(line: str) -> float:
    try:
        return float(line.rsplit(" ", 1)[1])
    except (IndexError, ValueError):
        return 0.0
