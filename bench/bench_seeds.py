"""One job configuration over several seeds, one job after another (embedded, local model): per-seed rows and a
markdown summary of initial test, best test and gain (mean ± std over seeds), plus where the best prompt came
from (its candidate's phase or origin).

    python -m bench.bench_seeds claps_greedy_dbpedia16 --seeds 0 1 2 --set n_clusters=64 train_subset=16

CONFIG is a file name under bench/jobs_cfg/ (without .json); `--set key=value` overrides params (JSON values).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from bench.bench_soft_seeds import _value, mean_std
from bench.jobs import run_embedded_job

CFG = Path(__file__).parent / "jobs_cfg"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="param overrides key=value (JSON values)")
    args = parser.parse_args()
    extra = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    runs = []
    for seed in args.seeds:
        body = json.loads((CFG / f"{args.config}.json").read_text())
        body["params"] = {**body["params"], **extra}
        body["seed"] = seed
        started = time.perf_counter()
        job = await run_embedded_job(body, with_candidates=True)
        initial, best = job["initial"] or {}, job["best"] or {}
        origin = next(
            (
                c["details"].get("phase") or c["details"].get("origin") or "search"
                for c in job["candidates"]
                if c["prompt"] == best.get("prompt")
            ),
            "?",
        )
        run = {
            "seed": seed,
            "status": job["status"],
            "initial_dev": initial.get("dev_score"),
            "initial_test": initial.get("test_score"),
            "best_dev": best.get("dev_score"),
            "best_test": best.get("test_score"),
            "best": best.get("prompt"),
            "best_from": origin,
            "llm_calls": job["usage"]["llm_calls"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        runs.append(run)
        print(json.dumps(run), f"error={job.get('error')}", flush=True)
    ok = [r for r in runs if r["best_test"] is not None and r["initial_test"] is not None]
    print()
    print(f"{args.config} + {json.dumps(extra)}, seeds {args.seeds}")
    print("| seeds | initial test | best test | test gain | dev gain | best came from | calls/run | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    cells = [
        str(len(ok)),
        mean_std([r["initial_test"] for r in ok]),
        mean_std([r["best_test"] for r in ok]),
        mean_std([r["best_test"] - r["initial_test"] for r in ok]),
        mean_std([r["best_dev"] - r["initial_dev"] for r in ok]),
        ", ".join(sorted({r["best_from"] for r in runs})),
        f"{sum(r['llm_calls'] for r in runs) / len(runs):.0f}",
        f"{sum(r['seconds'] for r in runs) / len(runs):.0f}",
    ]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    asyncio.run(main())
