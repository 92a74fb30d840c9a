"""The metered LLM: cache (LRU + durable), de-duplication, budget reservation, usage accounting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import pytest

from app.cache.flights import Flights, SharedFlights
from app.llm.metered import LRU, MeteredLLM, cache_key
from app.llm.port import BackendInfo, Capability, Generation, GenerationRequest, LabelScoreRequest, LabelScores
from app.usage import Budget, BudgetExhausted, Usage
from tests.conftest import REDIS_URL, SESSION_TAG


class CountingBackend:
    name = "count"

    def __init__(self):
        self.info = BackendInfo("count", "test", "m", frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS}))
        self.sent: list = []

    def count_tokens_upper_bound(self, text):
        return len(text)

    async def generate(self, requests, on_result=None):
        out = []
        for i, r in enumerate(requests):
            self.sent.append(r)
            g = Generation([f"{r.prompt}!{r.seed}"], 3, 1)
            if on_result:
                on_result(i, g)
            out.append(g)
        return out

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, r in enumerate(requests):
            self.sent.append(r)
            s = LabelScores([-1.0, float("-inf")], 5)
            if on_result:
                on_result(i, s)
            out.append(s)
        return out


class MemoryStore:
    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.usage = Usage()

    async def get_many(self, keys):
        return {k: self.rows[k] for k in keys if k in self.rows}

    def submit(self, key, model_id, value, usage):
        if key is not None:
            self.rows[key] = value
        self.usage.add(usage)

    async def flush(self):
        return None


def metered(backend, store=None, budget=None, usage=None):
    return MeteredLLM(backend, usage=usage or Usage(), budget=budget or Budget(), store=store, lru=LRU(100))


async def test_deterministic_requests_are_cached_and_deduplicated():
    backend, store = CountingBackend(), MemoryStore()
    llm = metered(backend, store)
    requests = [GenerationRequest("a"), GenerationRequest("a"), GenerationRequest("b", temperature=1.0, seed=7)]
    first = await llm.generate(requests)
    assert len(backend.sent) == 2  # the duplicate went once
    assert first[0].texts == first[1].texts
    assert llm.usage.llm_calls == 2 and llm.usage.cache_hits == 1
    assert llm.usage.prompt_tokens == 6 and llm.usage.completion_tokens == 2

    # A new process (empty LRU) finds the answers in the durable store.
    fresh = metered(backend, store)
    again = await fresh.generate(requests)
    assert [g.texts for g in again] == [g.texts for g in first]
    assert len(backend.sent) == 2 and fresh.usage.cache_hits == 3 and fresh.usage.llm_calls == 0
    assert store.usage.llm_calls == 2 and store.usage.cache_hits == 4


async def test_unseeded_sampling_is_never_cached():
    backend = CountingBackend()
    llm = metered(backend, MemoryStore())
    request = GenerationRequest("x", temperature=0.7)
    await llm.generate([request])
    await llm.generate([request])
    assert len(backend.sent) == 2


async def test_label_scores_survive_json_roundtrip():
    backend, store = CountingBackend(), MemoryStore()
    request = LabelScoreRequest("p", (" a", " b"))
    (fresh,) = await metered(backend, store).label_logprobs([request])
    (cached,) = await metered(backend, store).label_logprobs([request])
    assert fresh.logprobs == cached.logprobs == [-1.0, -1e9]


async def test_budget_is_reserved_before_sending():
    backend = CountingBackend()
    usage = Usage(llm_calls=8)
    llm = metered(backend, budget=Budget(max_llm_calls=10), usage=usage)
    with pytest.raises(BudgetExhausted):
        await llm.generate([GenerationRequest(str(i)) for i in range(3)])
    assert backend.sent == []  # nothing was sent: a batch that does not fit is refused whole
    await llm.generate([GenerationRequest("0"), GenerationRequest("1")])
    assert usage.llm_calls == 10
    # Cached answers are free even with the budget spent.
    await llm.generate([GenerationRequest("0")])
    assert usage.llm_calls == 10


async def test_token_budget_counts_upper_bound():
    backend = CountingBackend()
    llm = metered(backend, budget=Budget(max_tokens=20))
    with pytest.raises(BudgetExhausted):
        await llm.generate([GenerationRequest("x" * 10, max_tokens=16)])
    await llm.generate([GenerationRequest("x" * 2, max_tokens=4)])


def test_cache_key_covers_decoding_params():
    base = GenerationRequest("p")
    keys = {
        cache_key("m", "generate", base),
        cache_key("m2", "generate", base),
        cache_key("m", "generate", GenerationRequest("p", max_tokens=7)),
        cache_key("m", "generate", GenerationRequest("p", temperature=1.0, seed=1)),
        cache_key("m", "generate", GenerationRequest("p", temperature=1.0, seed=2)),
    }
    assert len(keys) == 5


class SlowBackend(CountingBackend):
    """Answers after a pause (so two jobs overlap), or fails every request when `fail` is set."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.fail = fail

    async def label_logprobs(self, requests, on_result=None):
        import asyncio

        from app.llm.port import BackendError

        await asyncio.sleep(0.05)
        if self.fail:
            self.sent.extend(requests)
            raise BackendError("refused")
        return await super().label_logprobs(requests, on_result)


@contextlib.asynccontextmanager
async def two_workers_flights(shared: bool):
    """The in-flight registries of two jobs: one process's (the same object), or two workers' on one Redis."""
    if not shared:
        flights = Flights()
        yield flights, flights
        return
    prefix = f"promptopt-test-{SESSION_TAG}:flight:{uuid.uuid4().hex[:6]}"
    pair = SharedFlights(REDIS_URL, prefix), SharedFlights(REDIS_URL, prefix)
    try:
        yield pair
        left = await pair[0].redis.keys(f"{prefix}:*")
        held = [await pair[0].redis.get(k) for k in left]
        assert not [v for v in held if v.startswith(b"pending:")]  # every claim ended
    finally:
        for flights in pair:
            await flights.aclose()


@pytest.mark.parametrize("shared", [False, True], ids=["one-worker", "two-workers"])
async def test_two_jobs_missing_the_cache_at_once_send_each_request_once(shared):
    async with two_workers_flights(shared) as (flights_a, flights_b):
        backend_a, backend_b = SlowBackend(), SlowBackend()
        job_a = MeteredLLM(backend_a, usage=Usage(), budget=Budget(), store=None, lru=LRU(100), flights=flights_a)
        job_b = MeteredLLM(backend_b, usage=Usage(), budget=Budget(), store=None, lru=LRU(100), flights=flights_b)
        requests = [LabelScoreRequest(f"p{i}", (" a", " b")) for i in range(5)]
        first, second = await asyncio.gather(job_a.label_logprobs(requests), job_b.label_logprobs(requests[::-1]))
        assert len(backend_a.sent) + len(backend_b.sent) == 5  # one request each, for both jobs
        assert [s.logprobs for s in first] == [s.logprobs for s in second[::-1]]
        assert job_a.usage.llm_calls + job_b.usage.llm_calls == 5
        assert job_a.usage.cache_hits + job_b.usage.cache_hits == 5  # the other job paid
        assert len(flights_a) == 0 and len(flights_b) == 0


@pytest.mark.parametrize("shared", [False, True], ids=["one-worker", "two-workers"])
async def test_a_job_waiting_on_a_failed_flight_sends_the_request_itself(shared):
    async with two_workers_flights(shared) as (flights_a, flights_b):
        failing, working = SlowBackend(fail=True), SlowBackend()
        first = MeteredLLM(failing, usage=Usage(), budget=Budget(), store=None, lru=LRU(100), flights=flights_a)
        second = MeteredLLM(working, usage=Usage(), budget=Budget(), store=None, lru=LRU(100), flights=flights_b)
        requests = [LabelScoreRequest(f"q{i}", (" a", " b")) for i in range(3)]
        failing_job = asyncio.create_task(first.label_logprobs(requests))
        # The failing job must hold the claims before the other asks (in Redis, two clients race otherwise).
        for _ in range(5000):  # polled: the registries offer no event for "claimed"
            if getattr(flights_a, "_mine", flights_a._futures):
                break
            await asyncio.sleep(0.001)
        outcome = await asyncio.gather(failing_job, second.label_logprobs(requests), return_exceptions=True)
        assert isinstance(outcome[0], Exception) and len(outcome[1]) == 3
        assert len(working.sent) == 3 and second.usage.llm_calls == 3
        assert len(flights_a) == 0 and len(flights_b) == 0


async def test_shared_flights_without_redis_send_for_themselves():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    flights = SharedFlights(f"redis://127.0.0.1:{port}/0", "x")
    try:
        backend = SlowBackend()
        job = MeteredLLM(backend, usage=Usage(), budget=Budget(), store=None, lru=LRU(100), flights=flights)
        scores = await job.label_logprobs([LabelScoreRequest("r", (" a", " b"))])
        assert len(scores) == 1 and len(backend.sent) == 1 and len(flights) == 0
    finally:
        await flights.aclose()
