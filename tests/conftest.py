"""Shared fixtures: a fresh Postgres database and Redis queue per test session, the fake vLLM server at
the LLM boundary, the API app, and in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from app.db import Database
from app.llm.registry import BackendRegistry
from app.main import create_app
from app.migrate import upgrade_async
from app.queue import SaqJobQueue
from app.settings import BackendSettings, QueueSettings, QuotaLimits, QuotaSettings, Settings
from tests.fakes.fake_vllm import FakeVLLMServer

PG_ADMIN = os.environ.get("PROMPTOPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PROMPTOPT_TEST_REDIS", "redis://127.0.0.1:6379/0")
SESSION_TAG = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
TEST_DB = f"promptopt_test_{SESSION_TAG}"
TEST_DB_URL = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + TEST_DB


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'CREATE DATABASE "{TEST_DB}"')
    await conn.close()
    await upgrade_async(TEST_DB_URL)
    yield TEST_DB_URL
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(scope="session")
def fake_llm() -> FakeVLLMServer:
    with FakeVLLMServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _reset_fake(request):
    if "fake_llm" in request.fixturenames:
        request.getfixturevalue("fake_llm").reset()


@pytest.fixture(autouse=True)
async def _no_leftover_jobs(request):
    """Jobs a test leaves queued must not run in a later test (they would skew its call counts)."""
    yield
    if "database_url" in request.fixturenames:
        conn = await asyncpg.connect(TEST_DB_URL.replace("postgresql+asyncpg://", "postgresql://"))
        await conn.execute(
            "UPDATE jobs SET status = 'cancelled', cancel_requested = true WHERE status IN ('queued', 'running')"
        )
        await conn.close()


def make_settings(database_url: str, fake_base_url: str, **queue_overrides) -> Settings:
    queue = QueueSettings(
        **{
            "name": f"promptopt-test-{SESSION_TAG}",
            "lease_seconds": 3.0,
            "heartbeat_seconds": 0.5,
            "reconcile_seconds": 0.5,
            "cancel_poll_seconds": 0.2,
            "concurrency": 2,
            **queue_overrides,
        }
    )
    # Tests submit and poll far faster than a person; the quota tests set their own limits.
    unlimited = QuotaLimits(
        requests_per_second=None, submissions_per_minute=None, concurrent_jobs=None, llm_calls_per_day=None
    )
    return Settings(
        quotas=QuotaSettings(default=unlimited, redis_prefix=f"promptopt-test-{SESSION_TAG}:quota"),
        database_url=database_url,
        redis_url=REDIS_URL,
        queue_backend="saq",
        queue=queue,
        backends={
            "default": BackendSettings(kind="openai_compat", base_url=fake_base_url, max_concurrency=16),
            "local": BackendSettings(kind="local", batch_size=16),
        },
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The same settings as environment variables, for worker subprocesses."""
    return settings.to_env()


@pytest.fixture
def settings(database_url: str, fake_llm: FakeVLLMServer) -> Settings:
    return make_settings(database_url, fake_llm.base_url)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.database_url)
    yield database
    await database.dispose()


async def insert_job(db, method: str, candidates: list[dict], tenant: str = "default", **job_fields) -> str:
    """A finished job written straight to the database, for what the fake LLM cannot run or does not produce. A
    candidate's `dev_score`, if given, is stored as its dev evaluation."""
    from app.jobs.models import Candidate, CandidateEvaluation, Job, JobStatus
    from app.optimizers.base import instruction_hash

    job_id = str(uuid.uuid4())
    async with db.transaction() as session:
        session.add(
            Job(
                id=job_id, tenant=tenant, method=method, status=JobStatus.SUCCEEDED.value, stop_reason="completed",
                step=max(c["step"] for c in candidates), total_steps=max(c["step"] for c in candidates), attempts=1,
                **{"spec": {}, **job_fields},
            )
        )  # fmt: skip
        await session.flush()
        for index, fields in enumerate(candidates):
            dev_score = fields.get("dev_score")
            fields = {k: v for k, v in fields.items() if k != "dev_score"}
            candidate = Candidate(job_id=job_id, prompt_hash=instruction_hash(f"{index}"), **fields)
            session.add(candidate)
            if dev_score is not None:
                await session.flush()
                session.add(CandidateEvaluation(candidate_id=candidate.id, split="dev", score=dev_score, n_examples=8))
    return job_id


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, registry: BackendRegistry | None = None) -> AsyncIterator[None]:
    """An in-process worker (real SAQ on Redis, real Postgres) for the duration of the block."""
    from workers.service import run_worker

    db = Database(settings.database_url)
    queue = SaqJobQueue(settings.redis_url, settings.queue)
    own_registry = registry is None
    registry = registry or BackendRegistry(settings)
    task = asyncio.create_task(run_worker(settings, db, queue, registry))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await queue.aclose()
        if own_registry:
            await registry.aclose()
        await db.dispose()


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[None]:
    async with running_worker(settings):
        yield


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def wait_for_status(client: httpx.AsyncClient, job_id: str, statuses: set[str], wait_s: float = 60) -> dict:
    deadline = time.monotonic() + wait_s
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {wait_s}s: {job}")
        await asyncio.sleep(0.1)


def label_job(**overrides) -> dict:
    """A small label-classification job on the bundled SNLI task, against the fake backend."""
    body = {
        "method": "opro",
        "task": {"dataset": "builtin:snli16"},
        "params": {"steps": 2, "candidates_per_step": 3, "exemplars_per_step": 2},
        "budget": {"max_llm_calls": 2000},
        "seed": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def serving(app) -> AsyncIterator[str]:
    """An ASGI app on a real port, in this event loop (for subprocesses, browsers and webhook receivers)."""
    import uvicorn

    port = free_port()
    # A bounded graceful shutdown: an event stream a client left open must not hold the test.
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(200):  # uvicorn offers a flag, not an event
        if server.started:
            break
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[str]:
    """The API with these settings on a real port."""
    async with serving(create_app(settings)) as url:
        yield url
