"""Scores prompts on a split of a task through a (metered) LLM.

All (prompt x example) requests of one `score` call go out as one batch, ordered prompt by prompt so
requests sharing an instruction prefix reach the server together (prefix-cache hits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from app.evaluation.metrics import METRICS, parse_label
from app.evaluation.task import Example, Task
from app.evaluation.templates import render
from app.llm.port import (
    BackendInfo,
    Capability,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
)


class ScoringLLM(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    async def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    async def label_logprobs(self, requests: list[LabelScoreRequest]) -> list[LabelScores]: ...


@dataclass(slots=True)
class PromptScore:
    prompt: str
    split: str
    score: float
    per_example: list[float] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.per_example)


class Evaluator:
    def __init__(self, task: Task, llm: ScoringLLM) -> None:
        if task.metric not in METRICS:
            raise ValueError(f"unknown metric {task.metric!r}")
        self.task = task
        self.llm = llm
        self.metric = METRICS[task.metric]

    @property
    def uses_label_logprobs(self) -> bool:
        return (
            self.task.metric == "label_accuracy"
            and bool(self.task.labels)
            and Capability.LABEL_LOGPROBS in self.llm.info.capabilities
        )

    def render(self, prompt: str, example: Example) -> str:
        return render(self.task.template, prompt, example.input)

    async def score(
        self, prompts: list[str], split: str = "train", examples: list[Example] | None = None
    ) -> list[PromptScore]:
        """Score every prompt on `examples` (default: the whole split) in one batch."""
        examples = self.task.split_examples(split) if examples is None else examples
        if not prompts:
            return []
        if not examples:
            return [PromptScore(p, split, 0.0) for p in prompts]
        predictions = await self.predict(prompts, examples)
        out = []
        for prompt, preds in zip(prompts, predictions, strict=True):
            per_example = [self.metric(pred, ex.target) for pred, ex in zip(preds, examples, strict=True)]
            out.append(PromptScore(prompt, split, sum(per_example) / len(per_example), per_example, preds))
        return out

    async def predict(self, prompts: list[str], examples: list[Example]) -> list[list[str]]:
        """Predictions (label or generated text) for every prompt x example, prompt-major."""
        rendered = [self.render(p, ex) for p in prompts for ex in examples]
        if self.uses_label_logprobs:
            verbalizers = tuple(self.task.verbalizer_texts())
            answers = await self.llm.label_logprobs([LabelScoreRequest(r, verbalizers) for r in rendered])
            labels = self.task.labels or []
            flat = [labels[max(range(len(labels)), key=a.logprobs.__getitem__)] for a in answers]
        else:
            generations = await self.llm.generate(
                [GenerationRequest(r, max_tokens=self.task.max_new_tokens, temperature=0.0) for r in rendered]
            )
            texts = [g.texts[0] if g.texts else "" for g in generations]
            if self.task.metric == "label_accuracy" and self.task.labels:
                flat = [parse_label(t, self.task.labels) for t in texts]
            else:
                flat = texts
        n = len(examples)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]
