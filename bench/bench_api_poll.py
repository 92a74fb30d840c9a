"""Status-poll latency of the API under many concurrent pollers (target: p50 < 5 ms at 200).

  python -m bench.bench_api_poll [--pollers 200] [--seconds 10] [--database-url postgresql+asyncpg://...]

Starts uvicorn (one process) on a free loopback port against the given Postgres database (migrated
first), submits one job (no worker runs, so it stays queued), then polls GET /v1/jobs/{id} from
`--pollers` concurrent clients, each once per `--interval` seconds, for `--seconds`, and prints latency
percentiles. The load generator
shares the machine with the server, so on 2 cores this is a pessimistic number.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

from app.migrate import upgrade


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def poll(url: str, job_id: str, pollers: int, seconds: float, interval: float) -> list[float]:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=pollers, max_keepalive_connections=pollers)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + seconds

        async def poller(offset: float) -> None:
            # Each poller asks once per `interval` (a UI or client polling loop), spread evenly in time.
            await asyncio.sleep(offset)
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                response = await client.get(f"/v1/jobs/{job_id}")
                response.raise_for_status()
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))

        await asyncio.gather(*(poller(interval * i / pollers) for i in range(pollers)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pollers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between one poller's requests")
    parser.add_argument("--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/promptopt_bench")
    args = parser.parse_args()
    upgrade(args.database_url)
    port = free_port()
    env = {
        **os.environ,
        "PROMPTOPT_DATABASE_URL": args.database_url,
        "PROMPTOPT_QUEUE_BACKEND": "inprocess",
        "PROMPTOPT_QUEUE__NAME": "promptopt-bench",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        job = httpx.post(f"{url}/v1/jobs", json={"method": "opro", "task": {"dataset": "builtin:snli16"}}).json()
        latencies = asyncio.run(poll(url, job["id"], args.pollers, args.seconds, args.interval))
    finally:
        server.terminate()
        server.wait(10)
    latencies.sort()
    ms = [1000 * x for x in latencies]
    print(
        f"## GET /v1/jobs/{{id}}: {args.pollers} pollers each every {args.interval:g} s, {args.seconds:.0f} s, "
        "one uvicorn process"
    )
    print(f"requests {len(ms)}  throughput {len(ms) / args.seconds:.0f}/s")
    print(
        f"p50 {statistics.median(ms):.1f} ms  p90 {ms[int(0.9 * len(ms))]:.1f} ms  "
        f"p99 {ms[int(0.99 * len(ms))]:.1f} ms  max {ms[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
