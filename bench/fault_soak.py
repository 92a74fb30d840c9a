"""Fault soak: many small jobs through worker processes that are killed at random, against an LLM server that
fails and resets requests, with (optionally) one LLM server outage and one Postgres outage on the way.

    python -m bench.fault_soak                                  # 100 jobs, 2 workers, kills every 3 s, 20% 5xx,
                                                                # 10% resets, a 10 s LLM outage, a 15 s Postgres one
    python -m bench.fault_soak --jobs 30 --llm-outage 0 --db-outage 0

The LLM server is the test suite's fake vLLM (tests/fakes/fake_vllm.py, in this process); a TCP fault proxy
(tests/fakes/fault_proxy.py) sits in front of it and in front of Postgres, so the machine's servers are never
restarted. Workers are `python -m workers` processes; the API runs in this process. Calls are counted at the
fake server: `answered` = LLM calls it completed, `charged` = the jobs' summed `usage.llm_calls`, `repeated` =
completed calls whose identical request had already completed once. Prints a markdown table.

`run_soak` is also what `tests/test_fault_soak.py` runs (smaller, without the long outages).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import asyncpg
import httpx

from app.main import create_app
from app.settings import BackendSettings, QueueSettings, Settings
from bench.scratch_db import scratch_database
from tests.fakes.fake_vllm import FakeVLLMServer
from tests.fakes.fault_proxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
LLM_KINDS = ("chat", "completions")
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class SoakConfig:
    jobs: int = 100
    workers: int = 2
    kill_every_s: float = 3.0  # SIGKILL a random worker this often; it is started again at once
    llm_5xx_rate: float = 0.2
    llm_reset_rate: float = 0.1
    llm_outage_s: float = 10.0  # one LLM server outage of this long once a third of the jobs ended (0: none)
    db_outage_s: float = 15.0  # one Postgres outage once two thirds ended (0: none)
    timeout_s: float = 900.0
    seed: int = 0


@dataclass
class SoakResult:
    jobs: int
    succeeded: int = 0
    failed: int = 0
    not_terminal: int = 0
    terminal_events_wrong: int = 0  # jobs without exactly one terminal state event
    kills: int = 0
    llm_outages: int = 0
    db_outages: int = 0
    connection_resets: int = 0
    answered: int = 0
    charged: int = 0
    repeated: int = 0
    retries: int = 0  # job-level retries (transient faults that ended an attempt)
    retry_causes: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    recovery_s: list[float] = field(default_factory=list)  # outage end -> next job finished
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def soak_settings(database_url: str, redis_url: str, llm_url: str, queue_name: str) -> Settings:
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        queue_backend="saq",
        queue=QueueSettings(
            name=queue_name,
            lease_seconds=3.0,
            heartbeat_seconds=0.5,
            reconcile_seconds=0.5,
            cancel_poll_seconds=0.2,
            concurrency=2,
            max_attempts=50,
            retry_base_seconds=0.2,
            retry_max_seconds=2.0,
            db_outage_seconds=60.0,
        ),
        backends={
            "default": BackendSettings(
                kind="openai_compat",
                base_url=llm_url,
                max_concurrency=16,
                max_retries=2,
                retry_base_delay_s=0.02,
                probe_interval_s=0.2,
                outage_wait_s=60.0,
            )
        },
    )


def worker_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **settings.to_env(), "PROMPTOPT_LOG_LEVEL": "INFO"}


def soak_job(i: int, tag: str) -> dict:
    return {
        "method": "opro",
        "task": {"dataset": "builtin:snli16"},
        "initial_prompt": f"Decide how the two sentences relate ({tag} {i}).",
        "params": {"steps": 1, "candidates_per_step": 2, "exemplars_per_step": 2},
        "budget": {"max_llm_calls": 2000},
        "seed": i,
    }


def _request_key(entry) -> str:
    return entry.kind + json.dumps(entry.body, sort_keys=True)


async def run_soak(cfg: SoakConfig, database_url: str, redis_url: str, workdir: Path) -> SoakResult:
    """`database_url`: a migrated Postgres database on 127.0.0.1:5432 (asyncpg URL)."""
    rng = random.Random(cfg.seed)
    tag = uuid.uuid4().hex[:8]
    result = SoakResult(cfg.jobs)
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    plain_db = database_url.replace("postgresql+asyncpg://", "postgresql://")
    with FakeVLLMServer(latency_s=0.005) as fake, FaultProxy("127.0.0.1", 5432, seed=cfg.seed) as pg:
        fake_port = int(fake.base_url.split(":")[2].split("/")[0])
        with FaultProxy("127.0.0.1", fake_port, seed=cfg.seed) as llm:
            llm_url = fake.base_url.replace(f":{fake_port}", f":{llm.port}")
            worker_db = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{pg.port}")
            settings = soak_settings(worker_db, redis_url, llm_url, f"promptopt-soak-{tag}")
            api_settings = settings.model_copy(update={"database_url": database_url})
            fake.fail_randomly(cfg.llm_5xx_rate, seed=cfg.seed)
            llm.reset_rate = cfg.llm_reset_rate

            logs = [(workdir / f"worker-{n}.log").open("a") for n in range(cfg.workers)]

            def start(n: int) -> subprocess.Popen:
                return subprocess.Popen(
                    [sys.executable, "-m", "workers"],
                    cwd=ROOT,
                    env=worker_env(settings),
                    stdout=logs[n],
                    stderr=subprocess.STDOUT,
                )

            workers = [start(n) for n in range(cfg.workers)]
            app = create_app(api_settings)
            started = time.monotonic()
            try:
                async with app.router.lifespan_context(app):
                    transport = httpx.ASGITransport(app=app)
                    async with httpx.AsyncClient(transport=transport, base_url="http://soak") as client:
                        ids = []
                        for i in range(cfg.jobs):
                            answer = await client.post("/v1/jobs", json=soak_job(i, tag))
                            answer.raise_for_status()
                            ids.append(answer.json()["id"])
                        conn = await asyncpg.connect(plain_db)
                        try:
                            await _drive(cfg, rng, result, conn, ids, workers, start, llm, pg, started)
                            await _tally(result, conn, ids)
                        finally:
                            await conn.close()
            finally:
                for proc in workers:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
                for log in logs:
                    log.close()
            await _drop_queue_keys(redis_url, settings.queue.name)
            fake.fail_randomly(0)
            result.wall_s = round(time.monotonic() - started, 1)
            result.connection_resets = llm.resets
            completed = fake.completed_requests(LLM_KINDS)
            result.answered = sum(e.prompts for e in completed)
            counts = Counter(_request_key(e) for e in completed)
            prompts = {_request_key(e): e.prompts for e in completed}
            result.repeated = sum((n - 1) * prompts[key] for key, n in counts.items() if n > 1)
    return result


async def _drive(cfg, rng, result, conn, ids, workers, start, llm, pg, started) -> None:
    """Kill workers at random and inject the outages until every job is terminal (or the timeout)."""
    next_kill = time.monotonic() + cfg.kill_every_s
    llm_outage_done = cfg.llm_outage_s <= 0
    db_outage_done = cfg.db_outage_s <= 0
    outage_ended: float | None = None
    ended_before = 0
    while True:
        try:
            ended = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE id = ANY($1::text[]) AND status = ANY($2::text[])", ids, list(TERMINAL)
            )
        except (OSError, asyncpg.PostgresError):
            ended = ended_before
        if outage_ended is not None and ended > ended_before:
            result.recovery_s.append(round(time.monotonic() - outage_ended, 1))
            outage_ended = None
        ended_before = ended
        if ended >= len(ids):
            return
        if time.monotonic() - started > cfg.timeout_s:
            result.errors.append(f"timeout with {len(ids) - ended} jobs not terminal")
            return
        now = time.monotonic()
        if now >= next_kill:
            n = rng.randrange(len(workers))
            workers[n].kill()
            workers[n].wait(10)
            workers[n] = start(n)
            result.kills += 1
            next_kill = now + cfg.kill_every_s
        if not llm_outage_done and ended >= len(ids) // 3:
            llm_outage_done = True
            llm.cut()
            await asyncio.sleep(cfg.llm_outage_s)
            llm.restore()
            result.llm_outages += 1
            outage_ended = time.monotonic()
        elif not db_outage_done and ended >= 2 * len(ids) // 3:
            db_outage_done = True
            pg.cut()
            await asyncio.sleep(cfg.db_outage_s)
            pg.restore()
            result.db_outages += 1
            outage_ended = time.monotonic()
        await asyncio.sleep(0.2)


async def _tally(result: SoakResult, conn, ids: list[str]) -> None:
    rows = await conn.fetch("SELECT status, llm_calls, attempts FROM jobs WHERE id = ANY($1::text[])", ids)
    statuses = Counter(r["status"] for r in rows)
    result.succeeded = statuses.get("succeeded", 0)
    result.failed = statuses.get("failed", 0)
    result.not_terminal = len(ids) - sum(statuses.get(s, 0) for s in TERMINAL)
    result.charged = sum(r["llm_calls"] for r in rows)
    result.attempts = sum(r["attempts"] for r in rows)
    terminal = await conn.fetch(
        "SELECT job_id, count(*) AS n FROM job_events WHERE job_id = ANY($1::text[]) AND type = 'state' "
        "AND (data::jsonb ->> 'status') = ANY($2::text[]) GROUP BY job_id",
        ids,
        list(TERMINAL),
    )
    per_job = {r["job_id"]: r["n"] for r in terminal}
    result.terminal_events_wrong = sum(1 for job_id in ids if per_job.get(job_id, 0) != 1)
    causes = await conn.fetch(
        "SELECT data::jsonb ->> 'cause' AS cause, count(*) AS n FROM job_events "
        "WHERE job_id = ANY($1::text[]) AND type = 'retry' GROUP BY 1",
        ids,
    )
    result.retry_causes = {r["cause"]: r["n"] for r in causes}
    result.retries = sum(result.retry_causes.values())
    errors = await conn.fetch(
        "SELECT DISTINCT error FROM jobs WHERE id = ANY($1::text[]) AND error IS NOT NULL LIMIT 5", ids
    )
    result.errors.extend(r["error"] for r in errors)


async def _drop_queue_keys(redis_url: str, queue_name: str) -> None:
    """The soak's own queue keys only (never anything else on the shared Redis)."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"saq:*{queue_name}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def table(result: SoakResult, cfg: SoakConfig) -> str:
    faults = (
        f"{result.kills} kill -9, {cfg.llm_5xx_rate:.0%} 5xx, {result.connection_resets} resets, "
        f"{result.llm_outages}× LLM down {cfg.llm_outage_s:g} s, "
        f"{result.db_outages}× Postgres down {cfg.db_outage_s:g} s"
    )
    per_kill = f"{result.repeated / result.kills:.2f}" if result.kills else "-"
    return "\n".join(
        [
            "| jobs | faults injected | succeeded | not terminal / wrong terminal events | answered | charged | "
            "usage difference | repeated calls (per kill) | job retries | recovery after outage (s) | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {result.jobs} | {faults} | {result.succeeded} | {result.not_terminal} / {result.terminal_events_wrong} "
            f"| {result.answered} | {result.charged} | {result.answered - result.charged} | {result.repeated} "
            f"({per_kill}) | {result.retries} | {', '.join(map(str, result.recovery_s)) or '-'} | {result.wall_s} |",
        ]
    )


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--llm-5xx", type=float, default=0.2)
    parser.add_argument("--llm-resets", type=float, default=0.1)
    parser.add_argument("--llm-outage", type=float, default=10.0)
    parser.add_argument("--db-outage", type=float, default=15.0)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin connection")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    cfg = SoakConfig(
        jobs=args.jobs,
        workers=args.workers,
        kill_every_s=args.kill_every,
        llm_5xx_rate=args.llm_5xx,
        llm_reset_rate=args.llm_resets,
        llm_outage_s=args.llm_outage,
        db_outage_s=args.db_outage,
    )
    async with scratch_database("promptopt_soak", args.pg) as url:
        result = await run_soak(cfg, url, args.redis, Path("/tmp") / url.rsplit("/", 1)[1])
    print(json.dumps({"config": asdict(cfg), "result": asdict(result)}, indent=1))
    print(table(result, cfg))


if __name__ == "__main__":
    asyncio.run(_main())
