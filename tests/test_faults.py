"""Jobs against the LLM server's and the database's ordinary faults, through a TCP fault proxy (tests/fakes/
fault_proxy.py) between the service and the real Postgres / the fake vLLM server. Nothing here restarts or
flushes the machine's shared servers. LLM calls are counted at the fake server's boundary."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from app.jobs.faults import Fault, classify, retry_delay
from app.jobs.repository import JobRepository
from app.llm.breaker import CircuitBreaker
from app.llm.metered import MeteredLLM
from app.llm.port import (
    BackendInfo,
    BackendUnavailable,
    Capability,
    CapabilityMissing,
    LabelScoreRequest,
    LabelScores,
)
from app.main import create_app
from app.settings import BackendSettings
from app.usage import Budget, Usage
from tests.conftest import TEST_DB_URL, label_job, make_settings, running_worker, wait_for_status
from tests.fakes.fault_proxy import FaultProxy
from tests.test_worker_crash import start_worker

LLM_KINDS = ("chat", "completions")


def through(proxy: FaultProxy, url: str, port: int) -> str:
    return url.replace(f"127.0.0.1:{port}", f"127.0.0.1:{proxy.port}")


def fake_port(fake_llm) -> int:
    return int(fake_llm.base_url.split(":")[2].split("/")[0])


def fault_settings(database_url: str, llm_url: str, backend: dict | None = None, **queue):
    """Test settings with quick per-request retries, a quick breaker probe, and quick job retries."""
    settings = make_settings(database_url, llm_url, **{"retry_base_seconds": 0.2, "retry_max_seconds": 1.0, **queue})
    settings.backends["default"] = BackendSettings(
        kind="openai_compat",
        base_url=llm_url,
        max_concurrency=16,
        max_retries=2,
        retry_base_delay_s=0.02,
        probe_interval_s=0.2,
        outage_wait_s=60,
        **(backend or {}),
    )
    return settings


@contextlib.asynccontextmanager
async def api(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def events_of(job_id: str) -> list[tuple[str, dict]]:
    conn = await asyncpg.connect(TEST_DB_URL.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch("SELECT type, data FROM job_events WHERE job_id = $1 ORDER BY id", job_id)
    finally:
        await conn.close()
    return [(r["type"], json.loads(r["data"]) if isinstance(r["data"], str) else r["data"]) for r in rows]


# --------------------------------------------------------------------------------- units


def test_faults_are_classified_with_clean_codes():
    assert classify(BackendUnavailable("llm: POST /completions failed after 3 attempt(s): HTTP 500")).transient
    assert classify(CapabilityMissing("no deep prompts")) == Fault("capability_missing", "no deep prompts", False)
    assert classify(ConnectionResetError("reset")).code == "database_unavailable"
    assert classify(ValueError("params.steps: too large")) == Fault("invalid_job", "params.steps: too large", False)
    internal = classify(KeyError("SELECT secret FROM t WHERE x = 'p'"))
    assert internal.code == "internal_error" and not internal.transient and "SELECT" not in internal.message
    delays = [retry_delay(n, 2.0, 60.0) for n in range(10)]
    assert all(min(60.0, 2.0 * 2**n) / 2 <= d <= min(60.0, 2.0 * 2**n) for n, d in enumerate(delays))


class FlakyScorer:
    """Answers label requests; the first call answers only its first `answer_first` requests and then fails
    with a transient error, as a server restarting mid-batch would."""

    name = "flaky"

    def __init__(self, answer_first: int) -> None:
        self.answer_first = answer_first
        self.sent: list[str] = []
        self.calls = 0
        self.info = BackendInfo("flaky", "scripted", "flaky-model", frozenset({Capability.LABEL_LOGPROBS}))

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text) + 1

    async def health(self) -> None:
        return None

    async def label_logprobs(self, requests, on_result=None):
        self.calls += 1
        out = []
        for i, request in enumerate(requests):
            if self.calls == 1 and i >= self.answer_first:
                raise BackendUnavailable("flaky: connection reset")
            self.sent.append(request.prompt)
            scores = LabelScores([-0.1, -2.0], prompt_tokens=3)
            on_result(i, scores)
            out.append(scores)
        return out


async def test_a_transient_failure_mid_batch_resends_only_the_unanswered_requests():
    scorer = FlakyScorer(answer_first=3)
    breaker = CircuitBreaker("flaky", scorer.health, probe_interval=0.01)
    usage = Usage()
    llm = MeteredLLM(scorer, usage=usage, budget=Budget(), store=None, breaker=breaker)
    requests = [LabelScoreRequest(f"prompt {i}", ("yes", "no")) for i in range(8)]
    answers = await llm.label_logprobs(requests)
    assert len(answers) == 8 and sorted(scorer.sent) == sorted(r.prompt for r in requests)  # each sent once
    assert usage.llm_calls == 8 and breaker.trips == 1 and not breaker.is_open
    await breaker.aclose()


async def test_breaker_wait_is_bounded():
    async def down() -> None:
        raise ConnectionError("refused")

    breaker = CircuitBreaker("dead", down, probe_interval=0.05, max_wait=0.3)
    breaker.trip(BackendUnavailable("dead: refused"))
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="unavailable for more than"):
        await breaker.wait_closed()
    assert time.monotonic() - started < 2 and breaker.snapshot().state == "open"
    await breaker.aclose()


# --------------------------------------------------------------------------------- the LLM server's faults


async def test_jobs_succeed_under_5xx_and_connection_resets(database_url, fake_llm, tmp_path):
    """20% of LLM calls answer 500 and 10% of requests have their connection reset; per-request retries are
    short (2), so some requests exhaust them: the job waits on the breaker and re-sends only what is missing."""
    with FaultProxy("127.0.0.1", fake_port(fake_llm), seed=1) as proxy:
        # Small batches: enough requests that some exhaust their retries.
        llm_url = through(proxy, fake_llm.base_url, fake_port(fake_llm))
        settings = fault_settings(database_url, llm_url, backend={"prompts_per_request": 2})
        fake_llm.fail_randomly(0.2, seed=3)
        proxy.reset_rate = 0.1
        async with api(settings) as client, running_worker(settings):
            ids = []
            for seed in range(3):
                body = label_job(seed=seed, initial_prompt=f"Relate the two sentences {tmp_path.name} {seed}.")
                ids.append((await client.post("/v1/jobs", json=body)).json()["id"])
            jobs = [await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=180) for job_id in ids]
        fake_llm.fail_randomly(0)
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
    assert proxy.resets > 0
    # Every answered call is charged once: the fake's completed LLM calls are exactly the jobs' usage.
    assert sum(j["usage"]["llm_calls"] for j in jobs) == fake_llm.count(LLM_KINDS, completed_only=True)
    kinds = [kind for job_id in ids for kind, _ in await events_of(job_id)]
    assert "backend_down" in kinds and "backend_up" in kinds  # some requests ran out of per-request retries
    # The worker ran in this process: its metrics are in this process's registry.

    assert REGISTRY.get_sample_value("promptopt_backend_trips_total", {"backend": "default"}) >= 1
    assert REGISTRY.get_sample_value("promptopt_backend_up", {"backend": "default"}) == 1


async def test_job_waits_while_the_llm_server_is_down(database_url, fake_llm, tmp_path):
    with FaultProxy("127.0.0.1", fake_port(fake_llm)) as proxy:
        settings = fault_settings(database_url, through(proxy, fake_llm.base_url, fake_port(fake_llm)))
        async with api(settings) as client, running_worker(settings):
            fake_llm.hold_after(20)
            body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
            job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
            await fake_llm.wait_held(1, wait_s=60)
            proxy.cut()  # the server "restarts": in-flight requests are reset, new ones refused
            down_since = time.monotonic()
            await asyncio.sleep(2)
            backends = {b["name"]: b for b in (await client.get("/v1/backends")).json()}
            assert backends["default"]["reachable"].startswith("down")
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["backend:default"].startswith("down")
            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - down_since)))
            assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"
            # The held requests' connections were reset seconds ago, so the fake sees them gone and completes none
            # of them (released at the cut, one could finish before the reset reached the fake: answered by the
            # server, never received by the worker).
            fake_llm.release()
            proxy.restore()
            job = await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=120)
            assert (await client.get("/readyz")).json()["checks"]["backend:default"] == "ok"
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1  # waited, not retried
    kinds = [kind for kind, _ in await events_of(job_id)]
    assert kinds.count("backend_down") >= 1 and kinds.count("backend_up") == kinds.count("backend_down")
    assert job["usage"]["llm_calls"] == fake_llm.count(LLM_KINDS, completed_only=True)


async def test_a_backend_down_for_good_uses_up_the_attempts_then_fails_cleanly(database_url, fake_llm, tmp_path):
    with FaultProxy("127.0.0.1", fake_port(fake_llm)) as proxy:
        settings = fault_settings(database_url, through(proxy, fake_llm.base_url, fake_port(fake_llm)), max_attempts=3)
        settings.backends["default"].outage_wait_s = 0.5
        async with api(settings) as client, running_worker(settings):
            fake_llm.hold_after(5)
            body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
            job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
            await fake_llm.wait_held(1, wait_s=60)
            proxy.cut()
            fake_llm.release()
            job = await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=120)
            proxy.restore()
    assert job["status"] == "failed" and job["attempts"] == 3
    assert job["error"].startswith("retries_exhausted: 3 attempts ended by faults; last backend_unavailable: ")
    retries = [data for kind, data in await events_of(job_id) if kind == "retry"]
    assert [r["cause"] for r in retries] == ["backend_unavailable"] * 2
    assert all(0.1 <= r["retry_in_s"] <= 1.0 for r in retries)


async def test_a_permanent_backend_error_fails_at_once_with_a_code(app_client, worker, fake_llm, tmp_path):
    fake_llm.fail_next(1000, status=400, kinds=LLM_KINDS)
    body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    job = await wait_for_status(app_client, job_id, {"succeeded", "failed"})
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"].startswith("backend_error: default: POST /v1/") and "HTTP 400" in job["error"]


# --------------------------------------------------------------------------------- the database's faults


async def test_job_rides_out_a_15s_database_outage(database_url, fake_llm, tmp_path):
    """Postgres unreachable for 15 s mid-step, for the worker and the API alike: the API answers 503 with
    Retry-After (and the first request after succeeds), the attempt goes on where it was, and the usage charged
    equals the LLM calls answered."""
    with FaultProxy("127.0.0.1", 5432) as pg:
        settings = fault_settings(through(pg, database_url, 5432), fake_llm.base_url, lease_seconds=30)
        async with api(settings) as client, running_worker(settings):
            fake_llm.hold_after(40)
            body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
            job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
            await fake_llm.wait_held(1, wait_s=60)
            pg.cut()
            fake_llm.release()  # answers keep arriving while the database is down
            during = await client.get(f"/v1/jobs/{job_id}")
            assert during.status_code == 503 and during.headers["retry-after"] == "5"
            assert during.json()["error"]["code"] == "unavailable"
            await asyncio.sleep(15)
            pg.restore()
            after = await client.get(f"/v1/jobs/{job_id}")
            assert after.status_code == 200
            job = await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1
    assert job["usage"]["llm_calls"] == fake_llm.count(LLM_KINDS, completed_only=True)


# --------------------------------------------------------------------------------- fencing


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
async def test_a_paused_worker_that_lost_its_lease_sends_nothing(app_client, settings, fake_llm, db, tmp_path):
    """SIGSTOP a worker process mid-job past its lease, let another attempt take the job, SIGCONT: the stale
    worker sends no LLM request after that (counted at the fake server) and stops."""
    fake_llm.latency_s = 0.05  # requests are in flight when the worker is paused
    body = label_job(params={"steps": 4}, initial_prompt=f"Relate the sentences {tmp_path.name}.")
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    worker = start_worker(settings, tmp_path / "worker-a.log")
    try:
        deadline = time.monotonic() + 60
        while fake_llm.count(LLM_KINDS) < 30:
            assert time.monotonic() < deadline, (tmp_path / "worker-a.log").read_text()[-3000:]
            await asyncio.sleep(0.05)
        os.kill(worker.pid, signal.SIGSTOP)
        await asyncio.sleep(settings.queue.lease_seconds + 1)
        # Another worker's attempt takes the expired lease. If the paused worker was inside a transaction on the
        # job row, the server ends its session after idle_in_transaction_session_timeout and the takeover goes on.
        async with db.transaction() as session:
            taken = await JobRepository(session).acquire_lease(job_id, worker_id="other", lease_seconds=600)
        assert taken is not None and taken.attempts == 2
        await asyncio.sleep(0.5)  # answers to requests already in flight arrive; they were sent before
        sent_before = fake_llm.count(LLM_KINDS)
        os.kill(worker.pid, signal.SIGCONT)
        await asyncio.sleep(3)
        assert fake_llm.count(LLM_KINDS) == sent_before
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGCONT)
        worker.kill()
        worker.wait(10)
    log = (tmp_path / "worker-a.log").read_text()
    assert "lost its lease" in log or "fenced off" in log, log[-3000:]


async def test_saq_sweep_never_aborts_a_healthy_attempt(app_client, settings, fake_llm, db, tmp_path):
    """The race: SAQ's sweep reads a message from the active list after a worker moved it there but before the
    worker marked it active (its status still says queued), and aborts it. The message may be re-queued (the
    lease makes the duplicate harmless), but the running attempt must go on undisturbed."""
    from saq import Queue
    from saq.job import Status

    fake_llm.hold_after(20)
    async with running_worker(settings):
        body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
        job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
        await fake_llm.wait_held(1, wait_s=60)
        async with db.transaction() as session:
            queue_key = (await JobRepository(session).get(job_id)).queue_key
        queue = Queue.from_url(settings.redis_url, name=settings.queue.name)
        await queue.connect()
        try:
            message = await queue.job(queue_key)
            assert message.status == Status.ACTIVE
            await queue.update(message, status=Status.QUEUED)  # as the sweep sees it inside the window
            # A sweep (the worker's own, every second here, or ours) finds it and marks it aborting.
            deadline = time.monotonic() + 20
            while (await queue.job(queue_key)).status != Status.ABORTING:
                assert time.monotonic() < deadline, "no sweep caught the message"
                await queue.sweep(lock=1)
                await asyncio.sleep(0.1)
        finally:
            await queue.disconnect()
        await asyncio.sleep(2.5)  # SAQ's abort poll (every second before the fix) would have cancelled it
        fake_llm.release()
        job = await wait_for_status(app_client, job_id, {"succeeded", "failed", "cancelled"}, wait_s=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job


async def test_a_stalled_attempt_is_ended_and_retried(database_url, fake_llm, tmp_path):
    """The LLM server accepts requests and never answers: no answer and no write for `stall_seconds`, so the
    attempt is ended and the job retried; once the server answers again the job finishes."""
    settings = fault_settings(database_url, fake_llm.base_url, stall_seconds=2.0)
    async with api(settings) as client, running_worker(settings):
        fake_llm.hold_after(10)
        body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
        job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
        await fake_llm.wait_held(1, wait_s=60)
        deadline = time.monotonic() + 30
        while not any(kind == "retry" for kind, _ in await events_of(job_id)):
            assert time.monotonic() < deadline, await events_of(job_id)
            await asyncio.sleep(0.2)
        fake_llm.release()
        job = await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=120)
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    retries = [data for kind, data in await events_of(job_id) if kind == "retry"]
    assert retries[0]["cause"] == "stalled"
    # The worker ran in this process: its metrics are in this process's registry.

    assert REGISTRY.get_sample_value("promptopt_stalled_attempts_total") >= 1


async def test_cache_writer_keeps_answers_through_an_outage_and_flush_is_bounded(database_url, db):
    """Answers submitted while Postgres is unreachable are kept, a flush gives up after `outage_seconds` with
    CacheWriteFailed instead of waiting forever, and once the database is back every answer is stored and its
    usage charged exactly once."""
    from app.cache.repository import CacheRepository
    from app.cache.store import CacheWriteFailed, DurableCacheStore
    from app.db import Database

    charged: list[Usage] = []

    async def charge(session, usage: Usage) -> None:
        charged.append(usage)

    with FaultProxy("127.0.0.1", 5432) as pg:
        proxied = Database(through(pg, database_url, 5432))
        store = DurableCacheStore(proxied, charge, outage_seconds=1.0)
        try:
            keys = [f"outage-test-{time.time_ns()}-{i}" for i in range(5)]
            store.submit(keys[0], "m", {"v": 0}, Usage(llm_calls=1))
            await store.flush()
            pg.cut()
            for i, key in enumerate(keys[1:], start=1):
                store.submit(key, "m", {"v": i}, Usage(llm_calls=1))
            started = time.monotonic()
            with pytest.raises(CacheWriteFailed):
                await store.flush()
            assert time.monotonic() - started < 5
            pg.restore()
            await store.flush()
        finally:
            await store.aclose()
            await proxied.dispose()
    async with db.transaction() as session:
        found = await CacheRepository(session).get_many(keys)
    assert sorted(v["v"] for v in found.values()) == [0, 1, 2, 3, 4]
    assert sum(u.llm_calls for u in charged) == 5


async def test_job_survives_redis_cut_mid_job(database_url, fake_llm, tmp_path):
    """Redis (the queue) unreachable for 5 s while a job runs: the attempt goes on (Postgres holds the lease)."""
    with FaultProxy("127.0.0.1", 6379) as redis_proxy:
        settings = fault_settings(database_url, fake_llm.base_url)
        settings.redis_url = settings.redis_url.replace("127.0.0.1:6379", f"127.0.0.1:{redis_proxy.port}")
        async with api(settings) as client, running_worker(settings):
            fake_llm.hold_after(20)
            body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
            job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
            await fake_llm.wait_held(1, wait_s=60)
            redis_proxy.cut()
            fake_llm.release()
            await asyncio.sleep(5)
            redis_proxy.restore()
            job = await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job


async def test_a_worker_that_starts_while_the_llm_server_is_down_waits_for_it(database_url, fake_llm, tmp_path):
    with FaultProxy("127.0.0.1", fake_port(fake_llm)) as proxy:
        settings = fault_settings(database_url, through(proxy, fake_llm.base_url, fake_port(fake_llm)))
        proxy.cut()
        async with api(settings) as client, running_worker(settings):
            body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
            job_id = (await client.post("/v1/jobs", json=body)).json()["id"]
            await asyncio.sleep(3)
            assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"
            proxy.restore()
            job = await wait_for_status(client, job_id, {"succeeded", "failed"}, wait_s=120)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job


async def test_a_write_whose_commit_answer_is_lost_is_not_charged_twice(db):
    """The commit reaches Postgres but the connection drops before its answer does: the writer cannot know, tries
    again, finds its marker row, and does not store or charge the batch a second time."""
    from app.cache.repository import CacheRepository
    from app.cache.store import DurableCacheStore

    class LosesOneCommitAnswer:
        def __init__(self, inner) -> None:
            self.inner = inner
            self.lost = False

        @contextlib.asynccontextmanager
        async def transaction(self):
            async with self.inner.transaction() as session:
                yield session
            if not self.lost:  # committed; the client hears of a dropped connection instead
                self.lost = True
                raise ConnectionResetError("connection reset after COMMIT")

    tag = f"ambiguous-{time.time_ns()}"

    async def charge(session, usage: Usage) -> None:  # a charge that commits or not with the batch
        await CacheRepository(session).put_many([(f"{tag}-charge-{time.time_ns()}", "m", {"calls": usage.llm_calls})])

    store = DurableCacheStore(LosesOneCommitAnswer(db), charge)
    keys = [f"{tag}-{i}" for i in range(3)]
    for i, key in enumerate(keys):
        store.submit(key, "m", {"v": i}, Usage(llm_calls=1))
    await store.flush()
    store.submit(f"{tag}-later", "m", {"v": 9}, Usage(llm_calls=1))  # the next write goes on as usual
    await store.aclose()
    async with db.transaction() as session:
        rows = await session.execute(sa.text("SELECT key, value FROM eval_cache WHERE key LIKE :p"), {"p": f"{tag}%"})
        found = dict(rows.all())
    charges = [v["calls"] for k, v in found.items() if "-charge-" in k]
    assert sorted(charges) == [1, 3]  # the first batch charged once, then the later answer
    assert {k for k in found if "-charge-" not in k} == {*keys, f"{tag}-later"}
