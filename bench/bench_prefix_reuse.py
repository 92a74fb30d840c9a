"""The local runner's prefix reuse on prompts that carry demonstrations, against scoring every prompt whole.

builtin:dbpedia16 (14 topics), its template, one demonstration per class (first 150 characters each, as `fewshot`
and `params.demonstrations` render them). Two workloads, each one evaluator call as a job step makes it:

- `fewshot`: `--sets` candidates, each its own stratified random demonstration set, on `--examples` dev inputs
  (what `fewshot`'s successive halving scores);
- `carried`: `--sets` instructions carrying one shared set (what OPRO/APO/Plum with `params.demonstrations`
  score), in both layouts: demonstrations first (one head shared by every candidate) and instruction first (a
  head per candidate).

Each is run with `prefix_reuse` off and on, alternately, `--repeats` times, in one process on one loaded model;
the table gives median wall seconds, the speed-up, the prompt tokens (what usage reports; the same both ways) and
the largest log-prob difference between the two.

    python -m bench.bench_prefix_reuse --sets 3 --examples 28 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from app.datasets.builtin import BUILTIN_TASKS
from app.evaluation.demonstrations import FixedDemonstrations, demonstrations_of, pick_demonstrations
from app.evaluation.evaluator import Evaluator
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.llm.registry import BackendRegistry
from app.settings import Settings

INSTRUCTIONS = [
    "Classify the text.",
    "What is the topic of this text?",
    "Read the Wikipedia abstract and name what kind of thing it describes.",
    "Which of the categories does this entity belong to?",
    "Topic classification.",
]


def dbpedia_task() -> Task:
    spec = BUILTIN_TASKS["dbpedia16"]
    return Task(
        examples=[Example(ex["input"], ex["target"]) for ex in spec.examples()],
        template=spec.template,
        metric="label_accuracy",
        labels=spec.labels,
        verbalizer=spec.verbalizer,
        split=SplitSpec(kind="k_shot", train_per_class=4, dev_per_class=4, seed=0),
    )


def workloads(task: Task, sets: int) -> dict[str, list[FixedDemonstrations]]:
    targets = [ex.target for ex in task.split_examples("train")]
    labels = task.labels or []

    def drawn(seed: int):
        return demonstrations_of(task, pick_demonstrations(targets, labels, len(labels), seed))

    shared = drawn(0)
    return {
        "fewshot: a set per candidate": [FixedDemonstrations(INSTRUCTIONS[0], drawn(s)) for s in range(sets)],
        "carried, demonstrations first": [FixedDemonstrations(i, shared) for i in INSTRUCTIONS[:sets]],
        "carried, instruction first": [
            FixedDemonstrations(i, shared, layout="instruction_first") for i in INSTRUCTIONS[:sets]
        ],
    }


async def main_async(args) -> None:
    registry = BackendRegistry(Settings())
    backend = await registry.get("default")
    await backend.start()
    task = dbpedia_task()
    dev = task.split_examples("dev")[: args.examples]
    evaluator = Evaluator(task, backend)
    print(f"{len(dev)} dev inputs; model {backend.info.model_id}; batch {backend.batch_size}")
    print("| workload | rows | prompt tokens | whole: s | reuse: s | speed-up | max log-prob difference |")
    print("|---|---|---|---|---|---|---|")
    try:
        for name, prompts in workloads(task, args.sets).items():
            seconds: dict[bool, list[float]] = {False: [], True: []}
            tables: dict[bool, list] = {}
            for _ in range(args.repeats):
                for reuse in (False, True):
                    backend.prefix_reuse = reuse
                    started = time.perf_counter()
                    tables[reuse] = await evaluator.label_tables(prompts, dev)
                    seconds[reuse].append(time.perf_counter() - started)
            difference = max(
                abs(a - b)
                for whole, reused in zip(tables[False], tables[True], strict=True)
                for row_a, row_b in zip(whole.logprobs, reused.logprobs, strict=True)
                for a, b in zip(row_a, row_b, strict=True)
            )
            tokens = sum(backend.count_tokens(evaluator.render(p, ex)) for p in prompts for ex in dev)
            off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
            print(
                f"| {name} | {len(prompts) * len(dev)} | {tokens} | {off:.1f} | {on:.1f} | {off / on:.2f}x "
                f"| {difference:.1e} |",
                flush=True,
            )
    finally:
        backend.prefix_reuse = True
        await registry.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=3, help="candidates per workload (at most 5)")
    parser.add_argument("--examples", type=int, default=28, help="dev inputs each candidate is scored on")
    parser.add_argument("--repeats", type=int, default=2)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
