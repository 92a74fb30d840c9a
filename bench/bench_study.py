"""A study on builtin:dbpedia16 with a stratified k-shot split: OPRO, APO, Plum, BBT and ClaPS at their `small`
presets, several seeds each, on the configured backend (default: the local CPU model), in embedded mode (a fresh
SQLite database, the in-process queue and worker). Prints progress lines, then the leaderboard as a Markdown table,
and writes the whole study (runs, leaderboard) as JSON.

    python -m bench.bench_study --seeds 0 1 2 --out /tmp/study.json

One job runs at a time (`--concurrency 1`) so that each run's wall time is its own."""

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

METHODS = ("opro", "apo", "plum", "bbt", "claps")
INITIAL_PROMPT = "Classify the text."


def held_out_split(test_per_class: int) -> tuple[list[dict], list[dict]]:
    """dbpedia16 cut once, per class: the first `test_per_class` examples (in a fixed shuffled order) are the test
    set of every run; the rest is the pool each seed draws its k-shot train and dev from."""
    import random

    from app.datasets.builtin import BUILTIN_TASKS

    by_class: dict[str, list[dict]] = {}
    for example in BUILTIN_TASKS["dbpedia16"].examples():
        by_class.setdefault(example["target"], []).append(example)
    pool, test = [], []
    for target in sorted(by_class):
        members = by_class[target]
        random.Random(target).shuffle(members)
        test += members[:test_per_class]
        pool += members[test_per_class:]
    return pool, test


def study_body(
    methods: list[str], seeds: list[int], per_class: int, max_llm_calls: int, test_dataset: str | None = None
) -> dict:
    task: dict = {
        "dataset": "builtin:dbpedia16",
        "split": {"kind": "k_shot", "train_per_class": per_class, "dev_per_class": per_class},
    }
    if test_dataset is not None:
        from app.datasets.builtin import BUILTIN_TASKS

        builtin = BUILTIN_TASKS["dbpedia16"]  # uploaded data gets the builtin's frame and labels explicitly
        task |= {"test_dataset": test_dataset, "template": builtin.template, "metric": builtin.metric}
        task |= {"labels": builtin.labels, "verbalizer": builtin.verbalizer}  # `dataset`: the pool, set by the caller
    return {
        "name": "dbpedia16 k-shot, small presets",
        "task": task,
        "initial_prompt": INITIAL_PROMPT,
        "arms": [
            {"method": m, "params": {"preset": "small"}, "budget": {"max_llm_calls": max_llm_calls}} for m in methods
        ],
        "seeds": seeds,
    }


def markdown(study: dict) -> str:
    lines = [
        "| arm | runs | test mean ± sd | 95% interval (seeds) | vs initial prompt: difference [95% CI], p (test) | "
        "mean LLM calls | mean tokens | mean s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in study["leaderboard"]:
        if row["test_mean"] is None:
            lines.append(f"| {row['arm']} | 0/{row['runs']} | - | - | - | - | - | - |")
            continue
        interval = row["test_interval"]
        initial = next((c for c in row["comparisons"] if c["against"] == "initial"), None)
        versus = "-"
        if initial is not None:
            low, high = initial["interval"]["low"], initial["interval"]["high"]
            versus = (
                f"{initial['difference']:+.3f} [{low:+.3f}, {high:+.3f}], "
                f"p={initial['p_value']:.3g} ({initial['test']}){' *' if initial['significant'] else ''}"
            )
        lines.append(
            f"| {row['arm']} | {row['finished']}/{row['runs']} | {row['test_mean']:.3f} ± {row['test_sd']:.3f} | "
            f"[{interval['low']:.3f}, {interval['high']:.3f}] | {versus} | {row['mean_llm_calls']:.0f} | "
            f"{row['mean_tokens']:.0f} | {row['mean_seconds']:.0f} |"
        )
    return "\n".join(lines)


async def run_study(client: httpx.AsyncClient, body: dict, out: Path | None) -> dict:
    """Submit a study, print each change of its job counts, keep the latest state in `out` (should the run be
    stopped early) and return it when it ends, with its wall seconds."""
    started = time.perf_counter()
    response = await client.post("/v1/studies", json=body)
    response.raise_for_status()
    study_id = response.json()["id"]
    last = None
    while True:
        study = (await client.get(f"/v1/studies/{study_id}")).json()
        line = f"{study['status']} {study['jobs']}"
        if line != last:
            print(f"{time.perf_counter() - started:7.0f}s {body['name']}: {line}", flush=True)
            last = line
        if out:
            await asyncio.to_thread(out.write_text, json.dumps(study, indent=2))
        if study["status"] in ("completed", "cancelled"):
            break
        await asyncio.sleep(5)
    study["wall_seconds"] = time.perf_counter() - started
    return study


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = Settings()
        settings = embedded_settings(base, Path(tmp) / "study.db")
        settings = settings.model_copy(
            update={"queue": base.queue.model_copy(update={"concurrency": args.concurrency})}
        )
        app = create_embedded_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b") as client:
                test_dataset = None
                if args.test_per_class:
                    pool, test = held_out_split(args.test_per_class)
                    made = await client.post("/v1/datasets", json={"name": "dbpedia16 pool", "examples": pool})
                    held = await client.post("/v1/datasets", json={"name": "dbpedia16 test", "examples": test})
                    test_dataset = held.json()["id"]
                body = study_body(args.methods, args.seeds, args.per_class, args.max_llm_calls, test_dataset)
                if test_dataset is not None:
                    body["task"]["dataset"] = made.json()["id"]
                return await run_study(client, body, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=1, help="train and dev examples per class")
    parser.add_argument("--max-llm-calls", type=int, default=800, help="per run (the test scoring takes 2 x 196)")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs at once")
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=0,
        help="a fixed held-out test set of this many examples per class (a separate test dataset) instead of the "
        "rest of the k-shot split",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    study = asyncio.run(run(args))
    if args.out:
        args.out.write_text(json.dumps(study, indent=2))
    print(f"\nstudy wall time {study['wall_seconds']:.0f} s\n")
    for job in study["runs"]:
        if job["status"] != "succeeded":
            print(f"run {job['arm']} seed {job['seed']}: {job['status']}")
    print(markdown(study))


if __name__ == "__main__":
    main()
