"""BBT / BBTv2 on dbpedia16 over several seeds and both soft-prompt forms, one job after another (embedded, local
model), printed as a markdown table of initial test, best test and gain (mean +- std over seeds).

    python -m bench.bench_soft_seeds                       # both methods, add and prepend, seeds 0 1 2
    python -m bench.bench_soft_seeds --methods bbt --insertions add --seeds 0 --set budget=48

The job bodies are bench/jobs_cfg/{method}_dbpedia16.json with the overrides below (shrunk so one run takes a few
minutes on 2 CPU cores), then `--set key=value` (JSON values) on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from bench.jobs import run_embedded_job

CFG = Path(__file__).parent / "jobs_cfg"
# Smaller than the single-seed configs so 3 seeds x 2 methods x 2 forms fit in an hour on a shared 2-core machine.
OVERRIDES = {
    "bbt": {"budget": 64, "popsize": 8, "eval_every": 16, "train_subset": 20},
    "bbtv2": {"budget": 120, "popsize": 4, "eval_every": 40, "train_subset": 14},
}


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def body_for(method: str, insertion: str, seed: int, extra: dict) -> dict:
    body = json.loads((CFG / f"{method}_dbpedia16.json").read_text())
    body["params"] = {**body["params"], **OVERRIDES[method], "insertion": insertion, **extra}
    body["seed"] = seed
    return body


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["bbt", "bbtv2"])
    parser.add_argument("--insertions", nargs="+", default=["add", "prepend"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="param overrides key=value (JSON values)")
    args = parser.parse_args()
    extra = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    rows = []
    for method in args.methods:
        for insertion in args.insertions:
            runs = []
            for seed in args.seeds:
                body = body_for(method, insertion, seed, extra)
                started = time.perf_counter()
                job = await run_embedded_job(body)
                initial, best = job["initial"] or {}, job["best"] or {}
                run = {
                    "status": job["status"],
                    "initial_dev": initial.get("dev_score"),
                    "initial_test": initial.get("test_score"),
                    "best_dev": best.get("dev_score"),
                    "best_test": best.get("test_score"),
                    "seconds": time.perf_counter() - started,
                }
                runs.append(run)
                print(f"{method} {insertion} seed {seed}: {json.dumps(run)} error={job.get('error')}", flush=True)
            ok = [r for r in runs if r["best_test"] is not None and r["initial_test"] is not None]
            rows.append(
                (
                    method,
                    insertion,
                    len(ok),
                    mean_std([r["initial_test"] for r in ok]),
                    mean_std([r["best_test"] for r in ok]),
                    mean_std([r["best_test"] - r["initial_test"] for r in ok]),
                    mean_std([r["best_dev"] - r["initial_dev"] for r in ok if r["best_dev"] is not None]),
                    f"{statistics.mean(r['seconds'] for r in runs):.0f}",
                )
            )
    print()
    print(f"params: {json.dumps(OVERRIDES)} + {json.dumps(extra)}")
    print("| method | form | seeds | initial test | best test | test gain | dev gain | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
