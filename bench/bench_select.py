"""Label-free prompt selection against selection on labelled dev data (issue: probability-based prompt selection).

For each dataset and seed (a seeded split of the bundled set): every candidate instruction is scored once on the
train inputs (targets unused), the dev split and the test split with the local model's label log-probs; from that
one table, without further calls, it reports the test accuracy of the prompt each rule picks:

- MI: mutual information on the train inputs' label probabilities (no labels);
- MI + CBM: the same on CBM-calibrated probabilities, its test predictions calibrated by CBM over the train inputs;
- best on dev: the candidate with the highest dev accuracy (uses labels);
- oracle: the best test accuracy among the candidates (the ceiling); the manual prompt (the first candidate).

    python -m bench.bench_select --datasets dbpedia16 snli16 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from app.datasets.builtin import BUILTIN_TASKS
from app.evaluation.calibration import argmax_labels, cbm, label_distribution
from app.evaluation.evaluator import Evaluator
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.llm.registry import BackendRegistry
from app.optimizers.select import criterion_values
from app.settings import Settings

# The builtin's manual prompt first, then hand-written alternatives of varying quality.
CANDIDATES = {
    "dbpedia16": [
        "Classify the text.",
        "What is the topic of this text?",
        "Choose the category: company, school, artist, athlete, politician, transportation, building, nature, "
        "village, animal, plant, album, film or book.",
        "Say whether the review is positive or negative.",
        "Read the Wikipedia abstract and name what kind of thing it describes.",
        "Answer with one word.",
        "Topic classification.",
        "Which of the categories does this entity belong to?",
    ],
    "snli16": [
        "Decide whether the hypothesis follows from the premise.",
        "Does the first sentence imply the second?",
        "Answer Yes if the hypothesis is true given the premise, No if it is false, Maybe otherwise.",
        "Read carefully.",
        "Natural language inference.",
        "Is the hypothesis entailed, contradicted or neither?",
        "Say whether the review is positive or negative.",
        "Think about what the premise says.",
    ],
}


def accuracy(probs: np.ndarray, examples: list[Example], labels: list[str]) -> float:
    predicted = argmax_labels(probs)
    return sum(labels[i] == ex.target for i, ex in zip(predicted, examples, strict=True)) / len(examples)


def one_split(task: Task, probs_all: np.ndarray, position: dict[Example, int], labels: list[str]) -> dict[str, float]:
    """The rules on one seeded split; `probs_all`: (prompts, every example, labels), scored once for all seeds."""
    splits = {name: task.split_examples(name) for name in ("train", "dev", "test")}
    probs = {name: probs_all[:, [position[ex] for ex in examples], :] for name, examples in splits.items()}
    test_acc = [accuracy(p, splits["test"], labels) for p in probs["test"]]
    dev_acc = [accuracy(p, splits["dev"], labels) for p in probs["dev"]]
    mi = criterion_values(probs["train"])["mi"]
    mi_cbm = criterion_values(np.stack([cbm(p) for p in probs["train"]]))["mi"]
    pick_cbm = int(np.argmax(mi_cbm))
    test_cbm = accuracy(cbm(probs["test"][pick_cbm], reference=probs["train"][pick_cbm]), splits["test"], labels)
    return {
        "manual prompt": test_acc[0],
        "MI (no labels)": test_acc[int(np.argmax(mi))],
        "MI + CBM (no labels)": test_cbm,
        "best on dev (labels)": test_acc[int(np.argmax(dev_acc))],
        "oracle (best on test)": max(test_acc),
    }


async def main_async(args) -> None:
    registry = BackendRegistry(Settings())
    backend = await registry.get("default")
    try:
        for name in args.datasets:
            spec = BUILTIN_TASKS[name]
            started = time.perf_counter()
            examples = [Example(ex["input"], ex["target"]) for ex in spec.examples()]
            position = {ex: i for i, ex in enumerate(examples)}

            def task_for(seed: int, spec=spec, examples=examples) -> Task:
                return Task(
                    examples=examples,
                    template=spec.template,
                    metric="label_accuracy",
                    labels=spec.labels,
                    verbalizer=spec.verbalizer,
                    split=SplitSpec(seed=seed),
                )

            tables = await Evaluator(task_for(0), backend).label_tables(CANDIDATES[name], examples)
            probs_all = np.stack([label_distribution(t.logprobs) for t in tables])
            rows = [one_split(task_for(seed), probs_all, position, spec.labels or []) for seed in args.seeds]
            n_test = len(task_for(0).split_examples("test"))
            print(
                f"\n{name}: {len(CANDIDATES[name])} candidates, seeds {args.seeds}, {n_test} test examples per seed, "
                f"{time.perf_counter() - started:.0f} s"
            )
            print("| rule | test accuracy, mean ± sd over seeds | per seed |")
            print("|---|---|---|")
            for rule in rows[0]:
                values = [r[rule] for r in rows]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                per_seed = ", ".join(f"{v:.3f}" for v in values)
                print(f"| {rule} | {statistics.mean(values):.3f} ± {sd:.3f} | {per_seed} |")
    finally:
        await registry.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--datasets", nargs="+", default=["dbpedia16", "snli16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
