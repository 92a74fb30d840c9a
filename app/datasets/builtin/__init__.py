"""Task sets bundled with the package (`builtin:<name>`), with their suggested task settings.

Attribution for every file under data/ is in SOURCES.md beside this module.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SOURCES = Path(__file__).resolve().parent / "SOURCES.md"

DBPEDIA_LABELS = [
    "company", "school", "artist", "athlete", "politician", "transportation", "building",
    "nature", "village", "animal", "plant", "album", "film", "book",
]  # fmt: skip
SNLI_LABELS = ["entailment", "neutral", "contradiction"]


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    description: str
    path: str
    template: str
    metric: str
    labels: list[str] | None = None
    verbalizer: dict[str, str] | None = None
    initial_prompt: str = ""
    max_new_tokens: int = 64
    license: str = ""
    extra: dict = field(default_factory=dict)

    def examples(self) -> list[dict[str, str]]:
        return _load(self.name)


def _tsv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return [row for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


@cache
def _load(name: str) -> list[dict[str, str]]:
    task = BUILTIN_TASKS[name]
    path = DATA_DIR / task.path
    if name == "dbpedia16":
        return [{"input": text.strip(), "target": DBPEDIA_LABELS[int(label)]} for text, label in _tsv(path)]
    if name == "snli16":
        return [
            {
                "input": f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}",
                "target": SNLI_LABELS[int(label)],
            }
            for premise, hypothesis, label in _tsv(path)
        ]
    if name.startswith("gsm8k"):
        return [{"input": row[0].strip(), "target": row[1].strip()} for row in _tsv(path)]
    data = json.loads(path.read_text(encoding="utf-8"))
    return [{"input": ex["input"], "target": ex["target"]} for ex in data["examples"]]


def _bbh_tasks() -> dict[str, BuiltinTask]:
    tasks = {}
    for path in sorted((DATA_DIR / "bbh").glob("*.json")):
        name = "bbh_" + path.stem
        tasks[name] = BuiltinTask(
            name=name,
            description=f"BIG-Bench Hard: {path.stem.replace('_', ' ')}",
            path=f"bbh/{path.name}",
            template="{prompt}\nQ: {input}\nA:",
            metric="answer_match",
            initial_prompt="Let's solve the problem.",
            license="MIT (BIG-Bench-Hard), via google-deepmind/opro (Apache-2.0)",
        )
    return tasks


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "dbpedia16": BuiltinTask(
        name="dbpedia16",
        description="DBpedia-14 topic classification, 16 examples per class (224).",
        path="dbpedia16/train.tsv",
        template="{prompt}\n{input}\nCategory:",
        metric="label_accuracy",
        labels=DBPEDIA_LABELS,
        initial_prompt="Classify the text.",
        max_new_tokens=8,
        license="CC BY-SA 3.0 (DBpedia), via QiushiSun/BBT-RGB (Apache-2.0)",
    ),
    "snli16": BuiltinTask(
        name="snli16",
        description="SNLI entailment, 16 examples per class (48).",
        path="snli16/train.tsv",
        template="{prompt}\n{input}\nDoes the premise entail the hypothesis? Answer:",
        metric="label_accuracy",
        labels=SNLI_LABELS,
        verbalizer={"entailment": " Yes", "neutral": " Maybe", "contradiction": " No"},
        initial_prompt="Decide whether the hypothesis follows from the premise.",
        max_new_tokens=8,
        license="CC BY-SA 4.0 (SNLI), via QiushiSun/BBT-RGB (Apache-2.0)",
    ),
    "gsm8k": BuiltinTask(
        name="gsm8k",
        description="GSM8K grade-school math, training file (7,473 problems).",
        path="gsm8k/gsm_train.tsv",
        template="{prompt}\nQ: {input}\nA:",
        metric="answer_match",
        initial_prompt="Let's solve the problem.",
        max_new_tokens=256,
        license="MIT (GSM8K), via google-deepmind/opro (Apache-2.0)",
    ),
    "gsm8k_test": BuiltinTask(
        name="gsm8k_test",
        description="GSM8K grade-school math, test file (1,319 problems).",
        path="gsm8k/gsm_test.tsv",
        template="{prompt}\nQ: {input}\nA:",
        metric="answer_match",
        initial_prompt="Let's solve the problem.",
        max_new_tokens=256,
        license="MIT (GSM8K), via google-deepmind/opro (Apache-2.0)",
    ),
    **_bbh_tasks(),
}
