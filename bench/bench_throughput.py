"""How full does a job keep a continuous-batching LLM server? Efficiency against `bench/sim_server.py`.

    python -m bench.bench_throughput                      # every scenario, one table
    python -m bench.bench_throughput --only opro_paper bare

Each scenario resets the simulated server, runs its work, and reports:
  * `bound_s`: the server's own lower bound for the work it received (see sim_server), `wall_s`: the jobs' wall time
    (first job start to last job end, from the job records; for `bare`, the client's), `efficiency` = bound / wall;
  * `calls`: LLM calls (prompts) answered, `requests`: HTTP requests carrying them, `mean_batch`: sequences per
    server step; `cpu_ms_per_call`: CPU time of the worker processes (user + system) per call.

Jobs run through the real service: the API in this process, `python -m workers` subprocesses, Postgres and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import httpx

from app.main import create_app
from app.settings import BackendSettings, QueueSettings, Settings
from bench.scratch_db import scratch_database

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("succeeded", "failed", "cancelled")
HIDDEN = 64


@dataclass
class Scenario:
    name: str
    jobs: list[dict]
    workers: int = 1
    jobs_per_worker: int = 2
    backend: dict | None = None  # BackendSettings overrides


def opro(steps: int, preset: str, seed: int = 0, tag: str = "") -> dict:
    return {
        "method": "opro",
        "task": {"dataset": "builtin:dbpedia16"},
        "initial_prompt": f"Classify the text into its category. {tag}",
        "params": {"preset": preset, "steps": steps},
        "budget": {"max_llm_calls": 100_000},
        "seed": seed,
    }


def method_job(method: str, params: dict, tag: str, backend: str = "default") -> dict:
    return {
        "method": method,
        "backends": {"scorer": backend, "optimizer": backend},
        "task": {"dataset": "builtin:dbpedia16"},
        "initial_prompt": f"Classify the text into its category. {tag}",
        "params": params,
        "budget": {"max_llm_calls": 100_000},
        "seed": 0,
    }


def scenarios(tag: str) -> dict[str, Scenario]:
    return {
        "opro_paper": Scenario("OPRO paper preset, 3 steps", [opro(3, "paper", tag=tag + " a")]),
        "opro_paper_1pr": Scenario(
            "the same, one prompt a request", [opro(3, "paper", tag=tag + " b")], backend={"prompts_per_request": 1}
        ),
        "apo_small": Scenario("APO small", [method_job("apo", {"preset": "small"}, tag + " c")]),
        # Demonstrations make prompts long: the same OPRO run bare and carrying one demonstration per class, and
        # `fewshot`. (The simulated server prefills every prompt token; vLLM's prefix cache would skip the shared
        # block, so these bounds are upper bounds for a real server.)
        "opro_small": Scenario("OPRO small, 4 steps", [opro(4, "small", tag=tag + " l")]),
        "opro_small_demos": Scenario(
            "the same, carrying 1 demonstration per class",
            [
                {
                    **opro(4, "small", tag=tag + " m"),
                    "params": {"preset": "small", "steps": 4, "demonstrations": {"k_per_class": 1}},
                }
            ],
        ),  # fmt: skip
        "fewshot_small": Scenario("fewshot small", [method_job("fewshot", {"preset": "small"}, tag + " n")]),
        "plum_small": Scenario("Plum small", [method_job("plum", {"preset": "small"}, tag + " d")]),
        "claps_small": Scenario("ClaPS small", [method_job("claps", {"preset": "small"}, tag + " e")]),
        "bbt_small": Scenario(
            "BBT small over prompt_embeds", [method_job("bbt", {"preset": "small"}, tag + " f", backend="embeds")]
        ),
        "apo8_1w": Scenario(
            "8 APO small jobs, 1 worker",
            [{**method_job("apo", {"preset": "small"}, f"{tag} j{i}"), "seed": i} for i in range(8)],
            1,
            8,
        ),  # fmt: skip
        "plum8_1w": Scenario(
            "8 Plum small jobs, 1 worker",
            [{**method_job("plum", {"preset": "small"}, f"{tag} k{i}"), "seed": i} for i in range(8)],
            1,
            8,
        ),  # fmt: skip
        "opro8_1w": Scenario(
            "8 OPRO small jobs, 1 worker", [opro(4, "small", i, f"{tag} g{i}") for i in range(8)], 1, 8
        ),
        "opro8_2w": Scenario(
            "8 OPRO small jobs, 2 workers", [opro(4, "small", i, f"{tag} h{i}") for i in range(8)], 2, 4
        ),
        "opro8_2w_fixed": Scenario(
            "the same, limit not fitted to the server queue",
            [opro(4, "small", i, f"{tag} i{i}") for i in range(8)],
            2,
            4,
            backend={"adapt_to_server_queue": False},
        ),
    }


def settings_for(database_url: str, redis_url: str, sim_url: str, weights: str, scenario: Scenario) -> Settings:
    common = {"kind": "openai_compat", "base_url": sim_url, **(scenario.backend or {})}
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        queue_backend="saq",
        queue=QueueSettings(name=f"promptopt-bench-{uuid.uuid4().hex[:8]}", concurrency=scenario.jobs_per_worker),
        backends={
            "default": BackendSettings(**common),
            # The simulated server cannot answer embedded text as the text itself (the probe's check), so the
            # soft-prompt backend is declared rather than probed.
            "embeds": BackendSettings(
                **common,
                probe=False,
                model="sim-model",
                capabilities=["generate", "label_logprobs", "input_embeddings"],
                embedding_weights=weights,
            ),
        },
    )


def result_row(
    scenario: str, stats: dict, wall: float, calls: int, cpu: float, prompt_tokens: int | None = None
) -> dict:
    """One table row: the server's bound and counters for the work, the client's wall time and CPU seconds, and
    the jobs' prompt tokens per call where jobs ran."""
    return {
        "scenario": scenario,
        "bound_s": stats["bound_s"],
        "wall_s": round(wall, 2),
        "efficiency": round(stats["bound_s"] / wall, 3),
        "calls": calls,
        "requests": stats["requests"],
        "mean_batch": stats["mean_batch"],
        "cpu_ms_per_call": round(1000 * cpu / max(1, calls), 3),
        "prompt_tokens_per_call": None if prompt_tokens is None else round(prompt_tokens / max(1, calls)),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


async def sim_stats(sim_root: str, reset: bool = False) -> dict:
    async with httpx.AsyncClient() as client:
        if reset:
            (await client.post(f"{sim_root}/sim/reset")).raise_for_status()
        return (await client.get(f"{sim_root}/sim/stats")).json()


async def run_scenario(scenario: Scenario, database_url: str, redis_url: str, sim_url: str, weights: str) -> dict:
    settings = settings_for(database_url, redis_url, sim_url, weights, scenario)
    sim_root = sim_url.rsplit("/v1", 1)[0]
    env = {**os.environ, **settings.to_env(), "PROMPTOPT_LOG_LEVEL": "WARNING"}
    logs = tempfile.TemporaryFile()
    workers = [start_worker(env, logs) for _ in range(scenario.workers)]
    app = create_app(settings)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=60) as client:
                await asyncio.sleep(3)  # workers import and connect
                cpu_before = sum(cpu_seconds(p.pid) for p in workers)
                await sim_stats(sim_root, reset=True)
                ids = []
                for body in scenario.jobs:
                    answer = await client.post("/v1/jobs", json=body)
                    if answer.status_code != 202:
                        raise RuntimeError(f"{scenario.name}: job refused: {answer.text}")
                    ids.append(answer.json()["id"])
                jobs = []
                for job_id in ids:
                    while True:
                        job = (await client.get(f"/v1/jobs/{job_id}")).json()
                        if job["status"] in TERMINAL:
                            break
                        await asyncio.sleep(0.5)
                    jobs.append(job)
                cpu = sum(cpu_seconds(p.pid) for p in workers) - cpu_before
                stats = await sim_stats(sim_root)
                stats.pop("timeline", None)  # SIM_TIMELINE=1 in the server's environment: every step, for analysis
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    failed = [j["error"] for j in jobs if j["status"] != "succeeded"]
    if failed:
        logs.seek(0)
        raise RuntimeError(f"{scenario.name}: jobs failed: {failed}\n{logs.read()[-3000:].decode(errors='replace')}")
    wall = max(_time(j["finished_at"]) for j in jobs) - min(_time(j["started_at"]) for j in jobs)
    calls = sum(j["usage"]["llm_calls"] for j in jobs)
    prompt_tokens = sum(j["usage"]["prompt_tokens"] for j in jobs)
    return result_row(scenario.name, stats, wall, calls, cpu, prompt_tokens)


async def bare_client(sim_url: str, total: int, in_flight: int, per_request: int) -> dict:
    """The ceiling: a minimal aiohttp client sending scoring completions, `in_flight` prompts at a time."""
    sim_root = sim_url.rsplit("/v1", 1)[0]
    await sim_stats(sim_root, reset=True)
    prompts = [
        f"Text number {i}: " + "a fairly ordinary sentence about a company " * 12 + "\nCategory:" for i in range(total)
    ]
    chunks = [prompts[i : i + per_request] for i in range(0, total, per_request)]
    limit = asyncio.Semaphore(max(1, in_flight // per_request))
    cpu_before = time.process_time()
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(chunk: list[str]) -> None:
            async with limit:
                body = {"model": "sim-model", "prompt": chunk if len(chunk) > 1 else chunk[0], "max_tokens": 1,
                        "logprobs": 2, "logprob_token_ids": [5, 6], "temperature": 0}  # fmt: skip
                async with session.post(f"{sim_url}/completions", json=body) as response:
                    await response.read()

        await asyncio.gather(*(one(c) for c in chunks))
    wall = time.monotonic() - started
    cpu = time.process_time() - cpu_before
    stats = await sim_stats(sim_root)
    name = f"bare client, {total} prompts, {in_flight} in flight, {per_request} a request"
    return result_row(name, stats, wall, total, cpu)


PEERS = {
    "promptolution": ("OPRO by promptolution 2.3.0, 3 steps, 32 concurrent", "promptolution_opro.py", ["--steps", "3"]),
    "dspy": ("COPRO by DSPy 3.4.1, breadth 8, depth 3, 32 threads", "dspy_copro.py", ["--depth", "3"]),
}
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"


async def run_peer(key: str, sim_url: str, workdir: Path) -> dict:
    """A peer library's optimizer on the same task and server, in its own environment (see DEVELOPERS.md)."""
    from app.datasets.builtin import BUILTIN_TASKS

    title, script, extra = PEERS[key]
    spec = BUILTIN_TASKS["dbpedia16"]
    examples = spec.examples()[:112]  # as many as our jobs' train split (half of 224)
    data = workdir / "peer-data.json"
    data.write_text(json.dumps({"examples": examples, "labels": list(spec.labels)}))
    sim_root = sim_url.rsplit("/v1", 1)[0]
    await sim_stats(sim_root, reset=True)
    before = os.times()
    proc = await asyncio.create_subprocess_exec(
        str(PEER_PYTHON), str(ROOT / "bench" / "peers" / script), "--url", sim_url, "--data", str(data), *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    after = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"{key} failed: {err.decode(errors='replace')[-3000:]}")
    wall = json.loads(out.decode().strip().splitlines()[-1])["wall_s"]
    stats = await sim_stats(sim_root)
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return result_row(title, stats, wall, stats["sequences"], cpu)


async def request_path(sim_url: str, total: int, database_url: str | None) -> dict:
    """The worker's request path alone, in this process: `MeteredLLM` (cache keys, budget, usage, and with
    `database_url` the write-behind store) over the openai_compat backend, scoring `total` new prompts at once."""
    from app.cache.lru import LRU
    from app.cache.store import DurableCacheStore
    from app.db import Database
    from app.llm.metered import MeteredLLM
    from app.llm.openai_compat import OpenAICompatBackend
    from app.llm.port import LabelScoreRequest
    from app.usage import Budget, Usage

    sim_root = sim_url.rsplit("/v1", 1)[0]
    backend = OpenAICompatBackend("sim", BackendSettings(kind="openai_compat", base_url=sim_url))
    await backend.start()
    db = Database(database_url) if database_url else None
    store = DurableCacheStore(db) if db else None
    llm = MeteredLLM(backend, usage=Usage(), budget=Budget(), store=store, lru=LRU(100_000))
    tag = uuid.uuid4().hex[:6]
    verbalizers = (" Company", " Artist", " Film", " School")
    requests = [
        LabelScoreRequest(f"Classify. {tag}\nText {i}: " + "an ordinary sentence about a company " * 12 + "\nCategory:",
                          verbalizers)
        for i in range(total)
    ]  # fmt: skip
    await sim_stats(sim_root, reset=True)
    cpu_before, started = time.process_time(), time.monotonic()
    await llm.label_logprobs(requests)
    if store is not None:
        await store.flush()
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_before
    stats = await sim_stats(sim_root)
    await backend.aclose()
    if db is not None:
        await store.aclose()
        await db.dispose()
    where = "with the Postgres cache store" if db else "without a store"
    return result_row(f"promptopt request path {where}, {total} prompts", stats, wall, total, cpu)


def start_worker(env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workers"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def start_sim(extra: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sim_server", "--hidden", str(HIDDEN), *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("SIM_URL="):
        proc.kill()
        raise RuntimeError(f"the simulated server did not start: {line!r}")
    return proc, line.strip().split("=", 1)[1]


def table(rows: list[dict]) -> str:
    head = (
        "| scenario | bound s | wall s | efficiency | LLM calls | HTTP requests | mean batch | worker CPU ms/call "
        "| prompt tokens/call |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_call = r.get("prompt_tokens_per_call")
        lines.append(
            f"| {r['scenario']} | {r['bound_s']} | {r['wall_s']} | **{r['efficiency']}** | {r['calls']} | "
            f"{r['requests']} | {r['mean_batch']} | {r['cpu_ms_per_call']} | {'–' if per_call is None else per_call} |"
        )
    return "\n".join(lines)


async def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="scenario keys (bare, opro_paper, ...); default: all")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--sim-arg", action="append", default=[], help="passed to bench.sim_server")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:6]
    chosen = scenarios(tag)
    keys = args.only or ["bare", *chosen, *PEERS]
    sim, sim_url = start_sim(args.sim_arg)
    rows: list[dict] = []
    try:
        from bench.sim_server import write_embedding_weights

        with tempfile.TemporaryDirectory() as tmp:
            weights = str(Path(tmp) / "embed.safetensors")
            write_embedding_weights(weights, HIDDEN)
            if "bare" in keys:
                rows.append(await bare_client(sim_url, 3000, 256, 1))
                rows.append(await bare_client(sim_url, 3000, 256, 16))
                print(table(rows), flush=True)
            async with scratch_database("promptopt_bench") as database_url:
                if "bare" in keys:
                    rows.append(await request_path(sim_url, 3000, None))
                    rows.append(await request_path(sim_url, 3000, database_url))
                    print(table(rows), flush=True)
                for key in keys:
                    if key == "bare":
                        continue
                    if key in PEERS:
                        if PEER_PYTHON.exists():
                            rows.append(await run_peer(key, sim_url, Path(tmp)))
                        else:
                            print(f"skipping {key}: run scripts/setup_bench_peers.sh first", flush=True)
                        continue
                    rows.append(await run_scenario(chosen[key], database_url, args.redis, sim_url, weights))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        sim.terminate()
        sim.wait(10)
    print(f"\nload average at the end (1/5/15 min): {load_average()}; {os.cpu_count()} CPUs")
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(_main())
