"""Prometheus metrics (GET /metrics): what an operator alerts on.

Series are process-global (`prometheus_client.REGISTRY`). The API serves them at /metrics; a worker process serves
its own (attempts, job durations, LLM calls) on `PROMPTOPT_WORKER_METRICS_PORT`; in embedded mode the API serves
both. The job gauges (`promptopt_jobs`, `promptopt_queue_depth`, `promptopt_queue_messages`) are read from
Postgres and the queue when /metrics is scraped, at most every `JOB_GAUGES_TTL_S` seconds, and only by the API.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import sqlalchemy as sa
from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------- API
JOBS_SUBMITTED = Counter("promptopt_jobs_submitted_total", "Jobs accepted by the API", ["method"])
HTTP_LATENCY = Histogram(
    "promptopt_http_request_seconds",
    "API latency: seconds until the response's headers are sent, by route template (`unmatched` for paths no "
    "route matches), HTTP method and status code",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# ---------------------------------------------------------------------------------------------------- jobs
# Read from the database at scrape time (API only).
JOBS = Gauge("promptopt_jobs", "Jobs in the database by status and method", ["status", "method"])
QUEUE_DEPTH = Gauge("promptopt_queue_depth", "Jobs waiting to run (status queued in the database)")
QUEUE_MESSAGES = Gauge("promptopt_queue_messages", "Messages in the SAQ queue on Redis, by state", ["state"])
GAUGE_ERRORS = Counter(
    "promptopt_metrics_refresh_errors_total", "Scrapes whose job gauges could not be refreshed", ["source"]
)
# Observed by the worker when it writes a job's terminal state.
JOB_DURATION = Histogram(
    "promptopt_job_duration_seconds",
    "Seconds from a job's first attempt starting to its terminal state, by method and final status",
    ["method", "status"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400),
)

# Worker side (served by the API's /metrics in embedded mode, by the worker's own port otherwise).
ATTEMPTS = Counter("promptopt_job_attempts_total", "Job attempts started", ["resumed"])
ATTEMPTS_ENDED = Counter(
    "promptopt_job_attempts_ended_total", "Job attempts that ended without finishing the job, by cause", ["cause"]
)
RETRIES = Counter("promptopt_job_retries_total", "Jobs scheduled for another attempt, by cause", ["cause"])
LEASE_LOSSES = Counter("promptopt_lease_losses_total", "Attempts stopped because their lease was lost")
STALLED = Counter("promptopt_stalled_attempts_total", "Attempts ended for making no progress")

# ---------------------------------------------------------------------------------------------------- backends
BACKEND_UP = Gauge("promptopt_backend_up", "1 while the backend's circuit breaker is closed", ["backend"])
BACKEND_TRIPS = Counter("promptopt_backend_trips_total", "Times a backend's circuit breaker opened", ["backend"])
LLM_CALLS = Counter("promptopt_llm_calls_total", "LLM requests answered by the backend (charged)", ["backend"])
LLM_TOKENS = Counter(
    "promptopt_llm_tokens_total", "Tokens charged for answered LLM requests, by type", ["backend", "type"]
)
LLM_CACHE_HITS = Counter(
    "promptopt_llm_cache_hits_total",
    "LLM requests answered without calling the backend (evaluation cache, or another job's request in flight)",
    ["backend"],
)
LLM_ERRORS = Counter(
    "promptopt_llm_errors_total",
    "Backend errors that reached a job after the backend's own per-request retries: `transient` ones make the job "
    "wait on the breaker and resend, `permanent` ones fail it",
    ["backend", "kind"],
)


def llm_answered(backend: str, prompt_tokens: int, completion_tokens: int) -> None:
    LLM_CALLS.labels(backend).inc()
    LLM_TOKENS.labels(backend, "prompt").inc(prompt_tokens)
    LLM_TOKENS.labels(backend, "completion").inc(completion_tokens)


def job_finished(method: str, status: str, started_at: datetime | None) -> None:
    """A job reached a terminal state (observed by the worker that wrote it)."""
    if started_at is None:
        return
    if started_at.tzinfo is None:
        started_at = started_at.replace(tzinfo=UTC)
    JOB_DURATION.labels(method, str(status)).observe(max(0.0, (datetime.now(UTC) - started_at).total_seconds()))


# ---------------------------------------------------------------------------------------------------- scrape time
JOB_GAUGES_TTL_S = 5.0
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
_refreshed_at: float | None = None


async def refresh_job_gauges(db, queue, methods: Iterable[str]) -> None:
    """Refresh the job gauges from one `GROUP BY status, method` query (and SAQ's queue length), at most every
    `JOB_GAUGES_TTL_S` seconds. `methods`: always reported, with 0 where no job has them, so series never vanish.
    A failure keeps the last values and counts in `promptopt_metrics_refresh_errors_total`."""
    global _refreshed_at
    now = time.monotonic()
    if _refreshed_at is not None and now - _refreshed_at < JOB_GAUGES_TTL_S:
        return
    _refreshed_at = now  # before awaiting: concurrent scrapes use the values as they are
    try:
        async with db.transaction() as session:
            rows = (
                await session.execute(sa.text("SELECT status, method, count(*) FROM jobs GROUP BY status, method"))
            ).all()
        counts = {(status, method): n for status, method, n in rows}
        JOBS.clear()
        for method in sorted(set(methods) | {m for _, m in counts}):
            for status in sorted(set(JOB_STATUSES) | {s for s, _ in counts}):
                JOBS.labels(status, method).set(counts.get((status, method), 0))
        QUEUE_DEPTH.set(sum(n for (status, _), n in counts.items() if status == "queued"))
    except Exception:
        GAUGE_ERRORS.labels("database").inc()
        log.warning("metrics: could not count jobs", exc_info=True)
    message_counts = getattr(queue, "message_counts", None)
    if message_counts is not None:
        try:
            for state, n in (await message_counts()).items():
                QUEUE_MESSAGES.labels(state).set(n)
        except Exception:
            GAUGE_ERRORS.labels("queue").inc()
            log.warning("metrics: could not count queue messages", exc_info=True)


# ---------------------------------------------------------------------------------------------------- middleware
def route_template(scope: Scope) -> str:
    """The template of the route that handled the request (`/v1/jobs/{job_id}`); for a request answered before
    routing (a middleware's rejection), the route its path would match; `unmatched` when none does."""
    route = scope.get("route")
    if route is None and "app" in scope:
        route, _ = _match(getattr(scope["app"], "routes", ()), scope)
    return getattr(route, "path", None) or "unmatched"


def _match(routes, scope: Scope) -> tuple[object | None, Match]:
    """The first route matching `scope` fully, else the first matching it but for the method (a 405), looking
    into included routers."""
    partial = None
    for route in routes:
        nested = getattr(route, "original_router", None)  # FastAPI's included router
        try:
            found, match = _match(nested.routes, scope) if nested is not None else (route, route.matches(scope)[0])
        except Exception:
            continue
        if match == Match.FULL:
            return found, match
        if match == Match.PARTIAL and partial is None:
            partial = found
    return partial, Match.PARTIAL if partial is not None else Match.NONE


class RequestMetrics:
    """Pure ASGI middleware feeding `promptopt_http_request_seconds` (a BaseHTTPMiddleware would buffer streamed
    responses). Timed to the response's start, so a streamed body (event streams) does not count as latency. The
    route label is the matched route's template, never the raw path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int | str) -> None:
            nonlocal observed
            if not observed:
                observed = True
                elapsed = time.perf_counter() - started
                HTTP_LATENCY.labels(route_template(scope), scope["method"], str(status)).observe(elapsed)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except Exception:
            observe(500)  # the server's error middleware (outside this one) answers 500
            raise
