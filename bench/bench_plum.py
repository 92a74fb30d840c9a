"""Plum: all six searches on one bundled label task with the local model at the same budget.

python -m bench.bench_plum [--dataset builtin:snli16] [--max-llm-calls 250] [--iterations N]
"""

from __future__ import annotations

import argparse
import asyncio

from bench.jobs import run_embedded_job

ALGORITHMS = ["hill_climbing", "simulated_annealing", "genetic", "genetic_crossover", "tabu", "harmony"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="builtin:snli16")
    parser.add_argument("--max-llm-calls", type=int, default=250)
    parser.add_argument("--initial-prompt", default="Say whether the review is positive or negative.")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    args = parser.parse_args()
    rows = []
    for algorithm in args.algorithms.split(","):
        body = {
            "method": "plum",
            "task": {"dataset": args.dataset},
            "initial_prompt": args.initial_prompt,
            "params": {"preset": "small", "algorithm": algorithm},
            "budget": {"max_llm_calls": args.max_llm_calls},
            "seed": 0,
        }
        job = asyncio.run(run_embedded_job(body))
        rows.append((algorithm, job))
        print(f"... {algorithm}: {job['status']} ({job['stop_reason']}) in {job['wall_seconds']:.0f} s", flush=True)

    def fmt(value):
        return "   -" if value is None else f"{value:.3f}"

    print(f"## Plum on {args.dataset}, local SmolLM2-135M, small preset, budget {args.max_llm_calls} LLM calls each")
    print(f"{'algorithm':<20} {'initial test':>12} {'best test':>9} {'best dev':>8} {'calls':>6} {'hits':>5} "
          f"{'steps':>5} {'stop':>9} {'wall s':>7}  best prompt")  # fmt: skip
    for algorithm, job in rows:
        initial, best = job["initial"] or {}, job["best"] or {}
        print(
            f"{algorithm:<20} {fmt(initial.get('test_score')):>12} {fmt(best.get('test_score')):>9} "
            f"{fmt(best.get('dev_score')):>8} {job['usage']['llm_calls']:>6} {job['usage']['cache_hits']:>5} "
            f"{job['progress']['step']:>5} {job['stop_reason'] or '-':>9} {job['wall_seconds']:>7.0f}  "
            f"{str(best.get('prompt'))[:60]!r}"
        )


if __name__ == "__main__":
    main()
