"""Run one job end to end in embedded mode (fresh SQLite database, in-process queue, configured backends)
and report it. Used by the method benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import httpx

from app.settings import Settings
from workers.embedded import create_embedded_app, embedded_settings

TERMINAL = {"succeeded", "failed", "cancelled"}


async def run_embedded_job(body: dict, with_candidates: bool = False) -> dict:
    """Run `body` to its end; `with_candidates` adds the job's candidates (all of them) under "candidates"."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = embedded_settings(Settings(), Path(tmp) / "bench.db")
        app = create_embedded_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as client:
                started = time.perf_counter()
                response = await client.post("/v1/jobs", json=body)
                response.raise_for_status()
                job_id = response.json()["id"]
                while True:
                    job = (await client.get(f"/v1/jobs/{job_id}")).json()
                    if job["status"] in TERMINAL:
                        break
                    await asyncio.sleep(0.5)
                job["wall_seconds"] = time.perf_counter() - started
                if with_candidates:
                    job["candidates"] = await all_candidates(client, job_id)
                return job


async def all_candidates(client: httpx.AsyncClient, job_id: str) -> list[dict]:
    items, cursor = [], None
    while True:
        query = "limit=200" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(f"/v1/jobs/{job_id}/candidates?{query}")).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def report(title: str, job: dict) -> None:
    usage = job["usage"]
    print(f"## {title}")
    print(f"status            {job['status']} ({job['stop_reason']}){'  ' + job['error'] if job['error'] else ''}")
    print(f"steps             {job['progress']['step']}/{job['progress']['total_steps']}")
    print(f"LLM calls         {usage['llm_calls']}")
    print(f"cache hits        {usage['cache_hits']}")
    evaluations = usage["llm_calls"] + usage["cache_hits"]
    print(f"evaluations/s     {evaluations / job['wall_seconds']:.1f} (calls + hits over wall time)")
    print(f"tokens            {usage['prompt_tokens']} prompt / {usage['completion_tokens']} completion")
    print(f"wall time         {job['wall_seconds']:.1f} s")
    for key in ("initial", "best"):
        entry = job[key] or {}
        dev, test = entry.get("dev_score"), entry.get("test_score")
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{key:<8} dev {fmt(dev)}  test {fmt(test)}  {entry.get('prompt')!r}")
    gain = (job["best"] or {}).get("test_gain")
    if gain:
        print(
            f"test gain         {gain['difference']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] "
            f"p={gain['p_value']:.3g} ({gain['test']}, n={gain['n']}, {gain['wins']} wins / {gain['losses']} losses)"
        )


def main() -> None:
    """python -m bench.jobs JOB.json [--title T]: run any job body embedded and report it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    body = json.loads(args.job.read_text())
    report(args.title or f"{body['method']} on {body['task']['dataset']}", asyncio.run(run_embedded_job(body)))


if __name__ == "__main__":
    main()
