"""A task as the evaluator sees it: examples, a template, a metric, labels, a seeded split."""

from __future__ import annotations

from dataclasses import dataclass, field

from app.evaluation.splits import SplitSpec, task_split_indices


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
    # The `llm_judge` metric's settings (JudgeSpec fields).
    judge: dict | None = None
    # A held-out set from another dataset: the test split, instead of a part of `examples`.
    test_examples: list[Example] | None = None
    _splits: dict[str, list[int]] | None = None

    def verbalizer_texts(self) -> list[str]:
        assert self.labels, "a label task needs labels"
        mapping = self.verbalizer or {}
        return [mapping.get(label, " " + label) for label in self.labels]

    def indices(self, split: str) -> list[int]:
        """Positions in `examples` (for "test" with `test_examples`: positions in those)."""
        if split == "test" and self.test_examples is not None:
            return list(range(len(self.test_examples)))
        if self._splits is None:
            self._splits = task_split_indices([ex.target for ex in self.examples], self.split)
        return self._splits[split]

    def split_examples(self, split: str) -> list[Example]:
        if split == "test" and self.test_examples is not None:
            return list(self.test_examples)
        return [self.examples[i] for i in self.indices(split)]
