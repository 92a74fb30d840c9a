"""Scores prompts on a split of a task through a (metered) LLM.

All (prompt x example) requests of one `score` call go out as one batch, ordered prompt by prompt so
requests sharing an instruction prefix reach the server together (prefix-cache hits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from app.evaluation.calibration import CONTENT_FREE_INPUT, argmax_labels, calibrate, label_distribution
from app.evaluation.judge import JudgeSpec, judge_request, parse_grade
from app.evaluation.metrics import METRICS, parse_label
from app.evaluation.task import Example, Task
from app.evaluation.templates import render
from app.llm.port import (
    BackendInfo,
    Capability,
    ContinuousPrefix,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
)

JUDGE_METRIC = "llm_judge"


class ScoringLLM(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    async def generate(self, requests: list[GenerationRequest]) -> list[Generation]: ...

    async def label_logprobs(self, requests: list[LabelScoreRequest]) -> list[LabelScores]: ...


@dataclass(frozen=True, slots=True)
class SoftPrompt:
    """A continuous prompt (BBT): `text` fills the template's {prompt} slot and `prefix` goes in front of the
    rendered prompt; `description` names it wherever a text prompt would be shown."""

    description: str
    text: str
    prefix: ContinuousPrefix


class PerExamplePrompt(ABC):
    """A text prompt whose {prompt} text depends on the example it is applied to: demonstrations chosen per input,
    or a fixed set that leaves out the example being scored. `description` names it wherever a text prompt would be
    shown (a score's `prompt`). The evaluator awaits `prepare` with the examples before rendering any of them, so the
    work a choice needs (embedding the inputs) runs off the event loop."""

    description: str

    async def prepare(self, examples: list[Example]) -> None:
        return None

    @abstractmethod
    def text_for(self, example: Example) -> str: ...


class Predictor(ABC):
    """What a method that adapts without a prompt leaves as its "prompt": a model that labels inputs itself from what
    it asks the scoring LLM (CrossTune: feature vectors, then a trained head). The evaluator scores its predictions
    with the task's metric like any prompt's. `description` names it wherever a text prompt would be shown;
    `capability` is what the scorer must offer to apply it; `model_id` the scorer model it was trained on."""

    description: str
    capability: Capability
    model_id: str | None = None

    @abstractmethod
    async def predict(self, llm: Any, task: Task, examples: list[Example]) -> list[str]:
        """One prediction per example, through `llm` (the evaluator's metered LLM)."""


Prompt = str | SoftPrompt | PerExamplePrompt | Predictor


def prompt_name(prompt: Prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt.description


async def prepare_prompts(prompts: list[Prompt], examples: list[Example]) -> None:
    for prompt in prompts:
        if isinstance(prompt, PerExamplePrompt):
            await prompt.prepare(examples)


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


@dataclass(slots=True)
class LabelTable:
    """One prompt's label scores on a list of inputs."""

    # Per input, each label's log-prob as the backend gave it (in `task.labels` order).
    logprobs: list[list[float]]
    # (inputs, labels): p(y|x), a softmax over the labels, after the task's calibration. Predictions are its argmax.
    probs: np.ndarray


class Evaluator:
    def __init__(self, task: Task, llm: ScoringLLM, judge_llm: ScoringLLM | None = None) -> None:
        """`judge_llm`: the backend that grades outputs, for the `llm_judge` metric."""
        if task.metric not in METRICS and task.metric != JUDGE_METRIC:
            raise ValueError(f"unknown metric {task.metric!r}")
        self.task = task
        self.llm = llm
        self.judge_llm = judge_llm
        self.metric = METRICS.get(task.metric)

    @property
    def uses_label_logprobs(self) -> bool:
        return (
            self.task.metric == "label_accuracy"
            and bool(self.task.labels)
            and Capability.LABEL_LOGPROBS in self.llm.info.capabilities
        )

    def render(self, prompt: Prompt, example: Example) -> str:
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, PerExamplePrompt):
            text = prompt.text_for(example)
        else:
            text = prompt.text
        return render(self.task.template, text, example.input)

    def _label_requests(self, prompts: list[Prompt], examples: list[Example]) -> list[LabelScoreRequest]:
        verbalizers = tuple(self.task.verbalizer_texts())
        return [
            LabelScoreRequest(self.render(p, ex), verbalizers, p.prefix if isinstance(p, SoftPrompt) else None)
            for p in prompts
            for ex in examples
        ]

    async def _label_scores(self, prompts: list[Prompt], examples: list[Example]) -> list[list[float]]:
        """Per request (prompt-major), each label's log-prob: its verbalizer texts' log-probs, combined by the
        task (several texts per label: their mean, `Task.label_logprobs`)."""
        await prepare_prompts(prompts, examples)
        answers = await self.llm.label_logprobs(self._label_requests(prompts, examples))
        return [self.task.label_logprobs(a.logprobs) for a in answers]

    async def score(
        self, prompts: list[Prompt], split: str = "train", examples: list[Example] | None = None
    ) -> list[PromptScore]:
        """Score every prompt on `examples` (default: the whole split) in one batch."""
        examples = self.task.split_examples(split) if examples is None else examples
        if not prompts:
            return []
        if not examples:
            return [PromptScore(prompt_name(p), split, 0.0) for p in prompts]
        predictions = await self.predict(prompts, examples)
        grades = await self._judge(predictions, examples) if self.metric is None else None
        out = []
        for index, (prompt, preds) in enumerate(zip(prompts, predictions, strict=True)):
            if grades is not None:
                per_example = grades[index]
            else:
                per_example = [self.metric(pred, ex.target) for pred, ex in zip(preds, examples, strict=True)]
            out.append(PromptScore(prompt_name(prompt), split, sum(per_example) / len(per_example), per_example, preds))
        return out

    async def _judge(self, predictions: list[list[str]], examples: list[Example]) -> list[list[float]]:
        """The judge's grades in [0, 1], per prompt and example, from one batch of requests."""
        if self.task.judge is None or self.judge_llm is None:
            raise ValueError("the llm_judge metric needs task.judge and a judge backend")
        spec = JudgeSpec(**self.task.judge)
        requests = [
            judge_request(spec, ex.input, ex.target, pred)
            for preds in predictions
            for pred, ex in zip(preds, examples, strict=True)
        ]
        replies = await self.judge_llm.generate(requests)
        grades = [parse_grade(r.texts[0] if r.texts else "", spec) for r in replies]
        n = len(examples)
        return [grades[i * n : (i + 1) * n] for i in range(len(predictions))]

    async def label_logprobs(self, prompts: list[Prompt], examples: list[Example]) -> list[list[list[float]]]:
        """Per prompt, per example: the log-prob of each label's verbalizer (in `task.labels` order), from one
        batch. For methods whose objective needs the distribution, not just the argmax (cross-entropy, KL)."""
        if not self.uses_label_logprobs:
            raise ValueError("label log-probs need a label_accuracy task with labels and a label_logprobs backend")
        scores = await self._label_scores(prompts, examples)
        n = len(examples)
        return [[scores[i * n + j] for j in range(n)] for i in range(len(prompts))]

    async def label_tables(
        self, prompts: list[Prompt], examples: list[Example], reference: list[Example] | None = None
    ) -> list[LabelTable]:
        """Per prompt: the label log-probs on `examples` and p(y|x) after `task.calibration`, from one batch. CBM's
        mean runs over `reference` (default: `examples` themselves); contextual calibration adds one request per
        prompt, the content-free input rendered with it."""
        if not self.uses_label_logprobs:
            raise ValueError("label log-probs need a label_accuracy task with labels and a label_logprobs backend")
        if not examples:
            return [LabelTable([], np.zeros((0, len(self.task.labels or [])))) for _ in prompts]
        calibration = self.task.calibration
        reference = reference if calibration == "cbm" and reference else None
        extra = reference or ([Example(CONTENT_FREE_INPUT, "")] if calibration == "contextual" else [])
        await prepare_prompts(prompts, [*examples, *extra])
        requests = self._label_requests(prompts, examples) + self._label_requests(prompts, extra)
        answers = await self.llm.label_logprobs(requests)
        scores = [self.task.label_logprobs(a.logprobs) for a in answers]
        n, m, k = len(examples), len(extra), len(prompts)
        tables = []
        for i in range(k):
            logprobs = scores[i * n : (i + 1) * n]
            side = label_distribution(scores[k * n + i * m : k * n + (i + 1) * m]) if m else None
            probs = calibrate(
                label_distribution(logprobs),
                calibration,
                reference=side if calibration == "cbm" else None,
                content_free=side[0] if side is not None and calibration == "contextual" else None,
            )
            tables.append(LabelTable(logprobs, probs))
        return tables

    async def predict(
        self, prompts: list[Prompt], examples: list[Example], reference: list[Example] | None = None
    ) -> list[list[str]]:
        """Predictions (label or generated text) for every prompt x example, prompt-major. `reference`: the inputs
        whose mean label probabilities CBM divides by (default: `examples`). A `Predictor` predicts by itself; the
        other prompts go out together, as one batch."""
        if any(isinstance(p, Predictor) for p in prompts):
            texts = [p for p in prompts if not isinstance(p, Predictor)]
            others = iter(await self.predict(texts, examples, reference) if texts else [])
            return [
                await p.predict(self.llm, self.task, examples) if isinstance(p, Predictor) else next(others)
                for p in prompts
            ]
        if self.uses_label_logprobs and self.task.calibration != "none":
            labels = self.task.labels or []
            tables = await self.label_tables(prompts, examples, reference)
            flat = [labels[i] for table in tables for i in argmax_labels(table.probs)]
        elif self.uses_label_logprobs:
            scores = await self._label_scores(prompts, examples)
            labels = self.task.labels or []
            flat = [labels[max(range(len(labels)), key=s.__getitem__)] for s in scores]
        elif self.task.calibration != "none":
            raise ValueError(
                f"calibration {self.task.calibration!r} needs a label task scored by label log-probs "
                "(label_accuracy with labels, and a backend with label_logprobs)"
            )
        else:
            if any(isinstance(p, SoftPrompt) for p in prompts):
                raise ValueError(
                    "a soft prompt needs a label task (label_accuracy with labels) scored by label log-probs"
                )
            await prepare_prompts(prompts, examples)
            rendered = [self.render(p, ex) for p in prompts for ex in examples]
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
