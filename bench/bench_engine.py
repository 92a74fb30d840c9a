"""Benchmark of the evaluation engine's overhead (not a test; numbers go in notes). The demo job has its own:
bench/bench_demo.py.

python -m bench.bench_engine overhead      # engine CPU per evaluation, instant in-process backend
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from app.datasets.builtin import BUILTIN_TASKS
from app.evaluation.evaluator import Evaluator
from app.evaluation.task import Example, Task
from app.llm.metered import LRU, MeteredLLM
from app.llm.port import BackendInfo, Capability, Generation, LabelScores
from app.usage import Budget, Usage


class InstantBackend:
    """Answers at once, so all measured time is the engine's."""

    name = "instant"

    def __init__(self) -> None:
        caps = frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS})
        self.info = BackendInfo("instant", "bench", "instant-model", caps)

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.encode()) + 16

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, r in enumerate(requests):
            answer = LabelScores([-float((hash((r.prompt, v)) % 100) / 10) for v in r.verbalizers], 50)
            if on_result:
                on_result(i, answer)
            out.append(answer)
        return out

    async def generate(self, requests, on_result=None):
        out = []
        for i, r in enumerate(requests):
            answer = Generation([r.prompt[-20:]], 50, 5)
            if on_result:
                on_result(i, answer)
            out.append(answer)
        return out


def dbpedia_task() -> Task:
    builtin = BUILTIN_TASKS["dbpedia16"]
    examples = [Example(e["input"], e["target"]) for e in builtin.examples()]
    return Task(examples, builtin.template, builtin.metric, labels=builtin.labels)


async def _overhead(store_url: str | None, rounds: int, prompts_per_round: int) -> dict:
    store = None
    db = None
    if store_url:
        from app.cache.store import DurableCacheStore
        from app.db import Database
        from app.migrate import upgrade_async

        await upgrade_async(store_url)
        db = Database(store_url)
        store = DurableCacheStore(db)
    task = dbpedia_task()
    llm = MeteredLLM(InstantBackend(), usage=Usage(), budget=Budget(max_llm_calls=10**9), store=store, lru=LRU(10**6))
    evaluator = Evaluator(task, llm)
    n_train = len(task.indices("train"))
    per_eval = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for r in range(rounds):
        prompts = [f"Classify the text, variant {r}-{i}." for i in range(prompts_per_round)]
        t0 = time.process_time()
        await evaluator.score(prompts, "train")
        per_eval.append((time.process_time() - t0) / (len(prompts) * n_train))
    cpu = time.process_time() - cpu_start
    wall = time.perf_counter() - wall_start
    evaluations = rounds * prompts_per_round * n_train
    # Cached re-evaluation (LRU hits): what a resumed step costs.
    t0 = time.process_time()
    await evaluator.score([f"Classify the text, variant 0-{i}." for i in range(prompts_per_round)], "train")
    cached = (time.process_time() - t0) / (prompts_per_round * n_train)
    if store is not None:
        await store.aclose()
    if db is not None:
        await db.dispose()
    return {
        "evaluations": evaluations,
        "cpu_us_per_eval_mean": 1e6 * cpu / evaluations,
        "cpu_us_per_eval_median_round": 1e6 * statistics.median(per_eval),
        "cpu_us_per_eval_cached": 1e6 * cached,
        "evals_per_second_wall": evaluations / wall,
    }


def overhead(args) -> None:
    print("## Engine overhead per evaluation (instant in-process backend, dbpedia16 train split)")
    rows = [("no durable cache", None)]
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("SQLite durable cache", f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"))
        if args.postgres_url:
            rows.append(("Postgres durable cache", args.postgres_url))
        print(f"{'store':<24} {'evals':>7} {'CPU us/eval':>12} {'median rnd':>11} {'cached':>8} {'evals/s':>9}")
        for label, url in rows:
            result = asyncio.run(_overhead(url, args.rounds, args.prompts))
            print(
                f"{label:<24} {result['evaluations']:>7} {result['cpu_us_per_eval_mean']:>12.1f} "
                f"{result['cpu_us_per_eval_median_round']:>11.1f} {result['cpu_us_per_eval_cached']:>8.1f} "
                f"{result['evals_per_second_wall']:>9.0f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["overhead"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--postgres-url", default=os.environ.get("PROMPTOPT_BENCH_PG"))
    args = parser.parse_args()
    overhead(args)


if __name__ == "__main__":
    main()
