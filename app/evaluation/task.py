"""A task as the evaluator sees it: examples, a template, a metric, labels, a seeded split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from app.evaluation.splits import SplitSpec, task_split_indices

# Backends answer -inf for a verbalizer token they could not see (outside a top-k); the metered LLM stores it as
# this finite floor (JSON has no -inf). At or below it a word's log-prob is unknown, not small.
UNSEEN_LOGPROB = -1e9


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
    # label -> text whose first token is scored, or several such texts (a verbalizer ensemble, their log-probs
    # averaged: `label_logprobs`); default " " + label.
    verbalizer: dict[str, str | list[str]] | None = None
    split: SplitSpec = field(default_factory=SplitSpec)
    max_new_tokens: int = 64
    # The `llm_judge` metric's settings (JudgeSpec fields).
    judge: dict | None = None
    # A held-out set from another dataset: the test split, instead of a part of `examples`.
    test_examples: list[Example] | None = None
    # How label probabilities are calibrated before the argmax (label log-prob scoring only): "none", "cbm"
    # (by their mean over the inputs scored together) or "contextual" (by a content-free input's); see
    # `app.evaluation.calibration`.
    calibration: str = "none"
    # How a training example is shown as a demonstration inside a prompt (`app.evaluation.demonstrations`): a text
    # with {input} and {target} slots (None: the task template's query followed by the answer as it is scored), the
    # input cut to `demo_max_chars` characters.
    demo_template: str | None = None
    demo_max_chars: int = 150
    _splits: dict[str, list[int]] | None = None

    def verbalizer_words(self) -> list[list[str]]:
        """Per label (in `labels` order), its verbalizer texts: one, or several (an ensemble)."""
        assert self.labels, "a label task needs labels"
        mapping = self.verbalizer or {}
        words = [mapping.get(label, " " + label) for label in self.labels]
        return [[w] if isinstance(w, str) else list(w) for w in words]

    def verbalizer_texts(self) -> list[str]:
        """Every verbalizer text to score, label by label (a label's several texts in their order): the order of
        the log-probs `label_logprobs` takes."""
        return [text for words in self.verbalizer_words() for text in words]

    def label_logprobs(self, text_logprobs: Sequence[float]) -> list[float]:
        """Each label's log-prob from the log-probs of `verbalizer_texts()`. A single text's is taken as it is;
        several texts' are averaged (the mean log-prob, i.e. the log of the geometric mean of the probabilities),
        over the texts the backend saw; a label none of whose texts was seen keeps the lowest value given."""
        per_label = self.verbalizer_words()
        if len(text_logprobs) != sum(len(words) for words in per_label):
            raise ValueError(f"{len(text_logprobs)} log-probs for {sum(map(len, per_label))} verbalizer texts")
        out: list[float] = []
        position = 0
        for words in per_label:
            values = [float(v) for v in text_logprobs[position : position + len(words)]]
            position += len(words)
            if len(values) == 1:
                out.append(values[0])
                continue
            seen = [v for v in values if math.isfinite(v) and v > UNSEEN_LOGPROB]
            out.append(sum(seen) / len(seen) if seen else min(values))
        return out

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
