"""A task as the evaluator sees it: examples, a template, a metric, labels, a seeded split."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.evaluation.splits import SplitSpec, split_indices


@dataclass(frozen=True, slots=True)
class Example:
    input: str
    target: str


@dataclass(slots=True)
class Task:
    examples: list[Example]
    template: str
    metric: str
    labels: list[str] | None = None
    # label -> text whose first token is scored; default " " + label.
    verbalizer: dict[str, str] | None = None
    split: SplitSpec = field(default_factory=SplitSpec)
    max_new_tokens: int = 64
    _splits: dict[str, list[int]] | None = None

    def verbalizer_texts(self) -> list[str]:
        assert self.labels, "a label task needs labels"
        mapping = self.verbalizer or {}
        return [mapping.get(label, " " + label) for label in self.labels]

    def indices(self, split: str) -> list[int]:
        if self._splits is None:
            self._splits = split_indices(len(self.examples), self.split)
        return self._splits[split]

    def split_examples(self, split: str) -> list[Example]:
        return [self.examples[i] for i in self.indices(split)]
