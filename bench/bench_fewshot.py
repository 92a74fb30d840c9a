"""Demonstrations against instructions: a study per dataset (builtin:dbpedia16, builtin:snli16) with a stratified
k-shot split, arms `fewshot` (its `small` preset), the manual prompt (`evaluate`), the manual prompt carrying one
random demonstration per class (`evaluate` with `params.demonstrations`) and OPRO (`small`), several seeds each, on
the configured backend (default: the local CPU model), in embedded mode (a fresh SQLite database, the in-process
queue and worker, one job at a time). Prints, per dataset, the leaderboard with the token cost: tokens per LLM call
over the whole run, and prompt tokens per test example of the returned prompt (what using it costs).

    python -m bench.bench_fewshot --datasets dbpedia16 snli16 --seeds 0 1 2 --per-class 4 --out /tmp/fewshot.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

import httpx

from app.settings import Settings
from bench.bench_study import run_study
from workers.embedded import create_embedded_app, embedded_settings

ARMS = ("fewshot", "evaluate", "evaluate+demos", "opro", "crosstune", "bbt")


def arm(name: str, max_llm_calls: int) -> dict:
    budget = {"max_llm_calls": max_llm_calls}
    if name == "fewshot":
        return {"method": "fewshot", "name": "fewshot small", "params": {"preset": "small"}, "budget": budget}
    if name == "evaluate":
        return {"method": "evaluate", "name": "manual prompt", "budget": budget}
    if name == "evaluate+demos":
        demos = {"demonstrations": {"strategy": "random", "k_per_class": 1}}
        return {"method": "evaluate", "name": "manual + 1 random demo/class", "params": demos, "budget": budget}
    if name == "opro":
        return {"method": "opro", "name": "opro small", "params": {"preset": "small"}, "budget": budget}
    if name in ("crosstune", "bbt"):
        return {"method": name, "name": f"{name} small", "params": {"preset": "small"}, "budget": budget}
    raise ValueError(f"unknown arm {name!r}")


def study_body(dataset: str, arms: list[str], seeds: list[int], per_class: int, max_llm_calls: int) -> dict:
    return {
        "name": f"{dataset}: demonstrations vs instructions",
        "task": {
            "dataset": f"builtin:{dataset}",
            "split": {"kind": "k_shot", "train_per_class": per_class, "dev_per_class": per_class},
        },
        "arms": [arm(a, max_llm_calls) for a in arms],
        "seeds": seeds,
    }


async def prompt_tokens_per_example(client: httpx.AsyncClient, job: dict, count_tokens) -> float | None:
    """Mean prompt tokens of the job's best prompt over its test inputs (a nearest-neighbour prompt per input)."""
    from app.datasets.builtin import BUILTIN_TASKS
    from app.evaluation.evaluator import Evaluator
    from app.jobs.engine import task_from_spec
    from app.optimizers.registry import METHODS

    if job.get("best") is None:
        return None
    name = job["spec"]["task"]["dataset"].removeprefix("builtin:")
    task = task_from_spec(job["spec"]["task"], BUILTIN_TASKS[name].examples())
    test = task.split_examples("test")
    prompt = job["best"]["prompt"]
    artifact = await client.get(f"/v1/jobs/{job['id']}/artifact")
    if artifact.status_code == 200:
        prompt = METHODS[job["method"]].prompt_from_artifact(artifact.json())
    if not isinstance(prompt, str) and not hasattr(prompt, "prepare"):
        return None  # not a text prompt (a CrossTune head, a soft prompt): no prompt tokens to count
    evaluator = Evaluator(task, None)  # type: ignore[arg-type]
    if not isinstance(prompt, str):
        await prompt.prepare(test)
    return statistics.fmean(count_tokens(evaluator.render(prompt, ex)) for ex in test)


def markdown(study: dict, costs: dict[str, list[dict]]) -> str:
    lines = [
        "| arm | runs | test mean ± sd | min-max | vs initial: difference, p | mean LLM calls | tokens / call | "
        "prompt tokens / test example | mean s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in study["leaderboard"]:
        runs = costs.get(row["arm"], [])
        scores = [r["test"] for r in runs if r["test"] is not None]
        span = f"{min(scores):.3f}-{max(scores):.3f}" if scores else "-"
        per_call = statistics.fmean(r["per_call"] for r in runs) if runs else float("nan")
        per_example = [r["per_example"] for r in runs if r["per_example"] is not None]
        example = f"{statistics.fmean(per_example):.0f}" if per_example else "-"
        initial = next((c for c in row["comparisons"] if c["against"] == "initial"), None)
        versus = "-" if initial is None else f"{initial['difference']:+.3f}, p={initial['p_value']:.3g}"
        mean = "-" if row["test_mean"] is None else f"{row['test_mean']:.3f} ± {row['test_sd'] or 0.0:.3f}"
        lines.append(
            f"| {row['arm']} | {row['finished']}/{row['runs']} | {mean} | {span} | {versus} | "
            f"{row['mean_llm_calls'] or 0:.0f} | {per_call:.0f} | {example} | {row['mean_seconds'] or 0:.0f} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> list[tuple[dict, dict]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Settings()
        settings = embedded_settings(base, Path(tmp) / "study.db")
        settings = settings.model_copy(update={"queue": base.queue.model_copy(update={"concurrency": 1})})
        app = create_embedded_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as client:
                from app.llm.registry import BackendRegistry

                registry = BackendRegistry(settings)
                backend = await registry.get("default")
                await backend.start()
                for dataset in args.datasets:
                    body = study_body(dataset, args.arms, args.seeds, args.per_class, args.max_llm_calls)
                    study = await run_study(client, body, args.progress)
                    costs: dict[str, list[dict]] = {}
                    for run_ in study["runs"]:
                        job = (await client.get(f"/v1/jobs/{run_['job_id']}")).json()
                        usage = job["usage"]
                        tokens = usage["prompt_tokens"] + usage["completion_tokens"]
                        costs.setdefault(run_["arm"], []).append(
                            {
                                "test": run_["test_score"],
                                "per_call": tokens / max(1, usage["llm_calls"]),
                                "per_example": await prompt_tokens_per_example(client, job, backend.count_tokens),
                                "best": job["best"]["prompt"] if job.get("best") else None,
                            }
                        )
                    results.append((study, costs))
                    table = f"\n{study['name']} (wall {study['wall_seconds']:.0f} s)\n\n{markdown(study, costs)}\n"
                    print(table, flush=True)  # each dataset's table as soon as its study ends
                    if args.out:
                        dump = json.dumps([{"study": s, "costs": c} for s, c in results], indent=2)
                        await asyncio.to_thread(args.out.write_text, dump)
                await registry.aclose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["dbpedia16", "snli16"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=4, help="train and dev examples per class (k-shot)")
    parser.add_argument("--max-llm-calls", type=int, default=1500, help="per run, test scoring included")
    parser.add_argument("--out", type=Path, default=None, help="every finished study with its costs, as JSON")
    parser.add_argument("--progress", type=Path, default=None, help="the study being run, as JSON")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
