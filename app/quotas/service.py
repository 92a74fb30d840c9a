"""Checking a tenant's limits: every request (requests per second) and every job submission (submissions per
minute, concurrent jobs, LLM calls per day)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

from app.errors import TooManyRequests
from app.quotas.counters import WindowCounters
from app.settings import QuotaSettings

# A full job's worth of retry: concurrent jobs free up as jobs finish, which takes a while.
CONCURRENT_JOBS_RETRY_AFTER_S = 30


class TenantJobCounts(Protocol):
    """What the job repository tells about a tenant's jobs."""

    async def count_active(self, tenant: str) -> int: ...

    async def llm_calls_since(self, tenant: str, since: datetime) -> int: ...


def start_of_day(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


class Quotas:
    def __init__(self, settings: QuotaSettings, counters: WindowCounters) -> None:
        self.settings = settings
        self.counters = counters

    async def check_request(self, tenant: str) -> None:
        limit = self.settings.limits(tenant).requests_per_second
        if limit is None:
            return
        count, left = await self.counters.hit(f"rps:{tenant}", 1.0)
        if count > limit:
            raise TooManyRequests(f"more than {limit} requests per second", left, "requests_per_second")

    async def check_submission(self, tenant: str, jobs: TenantJobCounts) -> None:
        limits = self.settings.limits(tenant)
        if limits.submissions_per_minute is not None:
            count, left = await self.counters.hit(f"submissions:{tenant}", 60.0)
            if count > limits.submissions_per_minute:
                raise TooManyRequests(
                    f"more than {limits.submissions_per_minute} job submissions per minute",
                    left,
                    "submissions_per_minute",
                )
        if limits.concurrent_jobs is not None and await jobs.count_active(tenant) >= limits.concurrent_jobs:
            raise TooManyRequests(
                f"{limits.concurrent_jobs} jobs are already queued or running (the concurrent job limit)",
                CONCURRENT_JOBS_RETRY_AFTER_S,
                "concurrent_jobs",
            )
        if limits.llm_calls_per_day is not None:
            now = datetime.now(UTC)
            today = start_of_day(now)
            if await jobs.llm_calls_since(tenant, today) >= limits.llm_calls_per_day:
                raise TooManyRequests(
                    f"today's {limits.llm_calls_per_day} LLM calls are spent (resets at midnight UTC)",
                    (today + timedelta(days=1) - now).total_seconds(),
                    "llm_calls_per_day",
                )

    async def aclose(self) -> None:
        await self.counters.aclose()
