"""Per-tenant rate limits and quotas: 429 with Retry-After, shared by API processes through Redis, per-tenant
overrides, and Redis down means limits fail open."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid

import asyncpg
import httpx

from app.main import create_app
from app.quotas.counters import MemoryWindowCounters, RedisWindowCounters
from app.settings import QuotaLimits, QuotaSettings
from tests.conftest import SESSION_TAG, TEST_DB_URL, label_job


def quota_settings(settings, tenant_limits: dict) -> tuple[object, str]:
    """Settings whose only key is a fresh tenant's, with that tenant's limits; returns them and the key."""
    tenant = f"quota-{uuid.uuid4().hex[:6]}"
    quotas = QuotaSettings(
        default=settings.quotas.default,  # the test settings' (unlimited)
        tenants={tenant: QuotaLimits(**tenant_limits)},
        redis_prefix=f"promptopt-test-{SESSION_TAG}:quota",
    )
    key = f"key-{tenant}"
    return settings.model_copy(update={"quotas": quotas, "api_keys": [f"{tenant}:{key}"]}), key


@contextlib.asynccontextmanager
async def clients(settings, count: int = 1):
    """`count` API apps on the same settings (as separate API processes would be)."""
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for _ in range(count):
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            out.append(await stack.enter_async_context(httpx.AsyncClient(transport=transport, base_url="http://t")))
        yield out


async def start_of_second() -> None:
    await asyncio.sleep(1.02 - time.time() % 1.0)


async def test_request_rate_is_shared_across_api_processes_and_resets(settings):
    limited, key = quota_settings(settings, {"requests_per_second": 3})
    headers = {"X-API-Key": key}
    async with clients(limited, 2) as (first, second):
        await start_of_second()
        answers = [await client.get("/v1/jobs", headers=headers) for client in (first, second, first, second)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429]
        refused = answers[-1]
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.json()["error"]["details"]["limit"] == "requests_per_second"
        assert refused.headers["Retry-After"] == "1"
        await asyncio.sleep(float(refused.headers["Retry-After"]))
        assert (await first.get("/v1/jobs", headers=headers)).status_code == 200
        # Liveness and metrics are not counted or limited.
        assert (await first.get("/healthz")).status_code == 200


async def test_submissions_per_minute(settings):
    limited, key = quota_settings(settings, {"submissions_per_minute": 2})
    async with clients(limited) as (client,):
        codes = [
            (await client.post("/v1/jobs", json=label_job(), headers={"X-API-Key": key})).status_code for _ in "abc"
        ]
        assert codes == [202, 202, 429]
        refused = await client.post("/v1/jobs", json=label_job(), headers={"X-API-Key": key})
        assert refused.json()["error"]["details"]["limit"] == "submissions_per_minute"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Reads are not submissions.
        assert (await client.get("/v1/jobs", headers={"X-API-Key": key})).status_code == 200


async def test_concurrent_jobs_frees_up_when_a_job_ends(settings):
    limited, key = quota_settings(settings, {"concurrent_jobs": 1})
    headers = {"X-API-Key": key}
    async with clients(limited) as (client,):
        first = await client.post("/v1/jobs", json=label_job(), headers=headers)
        assert first.status_code == 202
        refused = await client.post("/v1/jobs", json=label_job(), headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["details"]["limit"] == "concurrent_jobs"
        assert int(refused.headers["Retry-After"]) > 0
        assert (await client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=headers)).status_code == 200
        assert (await client.post("/v1/jobs", json=label_job(), headers=headers)).status_code == 202


async def test_llm_calls_per_day(settings):
    limited, key = quota_settings(settings, {"llm_calls_per_day": 100})
    headers = {"X-API-Key": key}
    async with clients(limited) as (client,):
        job = (await client.post("/v1/jobs", json=label_job(), headers=headers)).json()
        conn = await asyncpg.connect(TEST_DB_URL.replace("postgresql+asyncpg://", "postgresql://"))
        await conn.execute("UPDATE jobs SET llm_calls = 100, status = 'succeeded' WHERE id = $1", job["id"])
        await conn.close()
        refused = await client.post("/v1/jobs", json=label_job(), headers=headers)
        assert refused.status_code == 429 and refused.json()["error"]["details"]["limit"] == "llm_calls_per_day"
        assert 1 <= int(refused.headers["Retry-After"]) <= 86_400


async def test_default_limits_apply_to_tenants_without_an_override(settings):
    tenant_limits = QuotaSettings(
        default=QuotaLimits(requests_per_second=1),
        tenants={"vip": QuotaLimits(requests_per_second=1000)},
        redis_prefix=f"promptopt-test-{SESSION_TAG}:quota-{uuid.uuid4().hex[:6]}",
    )
    assert tenant_limits.limits("vip").requests_per_second == 1000
    assert tenant_limits.limits("vip").submissions_per_minute == tenant_limits.default.submissions_per_minute
    keyed = settings.model_copy(update={"quotas": tenant_limits, "api_keys": ["vip:v", "plain:p"]})
    async with clients(keyed) as (client,):
        await start_of_second()
        vip = [(await client.get("/v1/jobs", headers={"X-API-Key": "v"})).status_code for _ in range(3)]
        plain = [(await client.get("/v1/jobs", headers={"X-API-Key": "p"})).status_code for _ in range(3)]
        assert vip == [200, 200, 200] and plain == [200, 429, 429]


async def test_counters_fail_open_when_redis_is_unreachable():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    counters = RedisWindowCounters(f"redis://127.0.0.1:{port}/0", "x")
    try:
        assert (await counters.hit("rps:t", 1.0))[0] == 0
    finally:
        await counters.aclose()


async def test_memory_counters_count_per_window():
    counters = MemoryWindowCounters()
    await start_of_second()
    assert [(await counters.hit("a", 1.0))[0] for _ in range(3)] == [1, 2, 3]
    assert (await counters.hit("b", 1.0))[0] == 1
    await asyncio.sleep(1.0)
    assert (await counters.hit("a", 1.0))[0] == 1
