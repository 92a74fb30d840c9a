"""CrossTune - black-box few-shot classification with label enhancement (Luo et al., LREC-COLING 2024, arXiv
2403.12468). Method note: docs/methods/crosstune.md.

No prompt is searched. The scorer model is used as a frozen feature extractor (`features`): each input, rendered
with the task's template and the manual prompt, becomes one vector (by default the last-layer hidden state at the
prompt's last token, where the label would be read from). Each label gets a description (given in `params`, or
written by the optimizer LLM), encoded the same way. A small label-enhanced cross-attention head (`head.py`) - the
input attends over the label descriptions, then a classifier - is trained on the training examples on CPU, with the
epoch chosen on dev. Optionally the optimizer LLM writes extra training examples per label in context, and a switch
keeps only those that a judge trained on the real examples agrees with (`augment.py`); a second head is trained on
real and kept examples.

Steps: step 0 scores the manual prompt as every method does (the job's `initial`, so the job's gain is the head
against the manual prompt); step 1 writes descriptions and examples, encodes everything in one batch, trains the
head(s) and reports each as a candidate whose artifact is the head itself (weights as base64 float32, label order,
descriptions, feature model). The candidate with the better dev accuracy during training leads; the engine scores it
on dev and test like any prompt: `HeadPredictor` is an evaluator `Predictor` that labels inputs from their features.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from app.evaluation.evaluator import Predictor
from app.evaluation.task import Example, Task
from app.evaluation.templates import render
from app.llm.port import Capability, FeatureRequest, GenerationRequest
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    StepReport,
    derived_rng,
    derived_seed,
    label_task_problems,
    settle,
    train_subset_field,
)
from app.optimizers.crosstune import augment
from app.optimizers.crosstune.head import Head, HeadSettings, train_head

ARTIFACT_VERSION = 1
# Purpose keys of the seeded draws (with the job seed).
_DESCRIBE, _AUGMENT, _HEAD = 801, 802, 803


class CrossTuneParams(MethodParams):
    label_descriptions: dict[str, Annotated[str, Field(min_length=1, max_length=2000)]] | None = Field(
        None,
        description="label -> a description of what its inputs are like. Labels left out get one written by the "
        "optimizer LLM.",
    )
    describe_shots: int = Field(
        2,
        ge=0,
        le=16,
        description="Training inputs of a label shown to the optimizer LLM when it writes that label's description.",
    )
    description_max_tokens: int = Field(64, ge=8, le=1024, description="Tokens a written description may take.")
    feature_input: Literal["rendered", "input"] = Field(
        "rendered",
        description="What is encoded: the task's template with the manual prompt and the input (rendered), or the "
        "input alone. Label descriptions are encoded the same way, in the input's place.",
    )
    pooling: Literal["last", "mean"] = Field(
        "last",
        description="Local model: the last-layer hidden state at the text's last token (last) or its mean over the "
        "tokens (mean). An HTTP server pools as it was configured to.",
    )
    hidden_size: int = Field(64, ge=4, le=1024, description="Width of the head (projection, attention, classifier).")
    heads: int = Field(4, ge=1, le=64, description="Attention heads; must divide hidden_size.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the projected input and before the classifier.")
    learning_rate: float = Field(5e-3, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0.0, le=10.0, description="AdamW weight decay.")
    max_epochs: int = Field(200, ge=1, le=10_000, description="Training epochs at most.")
    patience: int = Field(30, ge=1, le=10_000, description="Epochs without a better dev score before training stops.")
    batch_size: int = Field(16, ge=1, le=4096, description="Training minibatch size.")
    augment_per_label: int = Field(
        0, ge=0, le=256, description="Training inputs the optimizer LLM writes per label (0: no augmentation)."
    )
    augment_shots: int = Field(
        4, ge=0, le=32, description="Labelled training examples shown in each request for new ones (in context)."
    )
    augment_temperature: float = Field(0.8, gt=0.0, le=2.0, description="Sampling temperature of written examples.")
    augment_max_tokens: int = Field(96, ge=8, le=2048, description="Tokens a written example may take.")
    switch: Literal["head", "centroid", "none"] = Field(
        "head",
        description="Which written examples are kept: those the head trained on real examples assigns to their "
        "intended label (head), those nearest their intended label's centroid of real examples (centroid), or all "
        "(none).",
    )
    switch_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="head switch: the least probability of the intended label to keep one."
    )
    train_subset: int | None = train_subset_field()


_SMALL: dict[str, Any] = {"hidden_size": 32, "heads": 2, "max_epochs": 100, "patience": 20}
# The paper's ingredients: label descriptions, examples written in context, the switch.
_PAPER: dict[str, Any] = {"augment_per_label": 8, "augment_shots": 4, "switch": "head"}


def feature_text(feature_input: str, template: str, instruction: str, text: str) -> str:
    return render(template, instruction, text) if feature_input == "rendered" else text


def description_input(label: str, description: str) -> str:
    """What stands in for an input when a label description is encoded."""
    return f"{label}: {description}"


class HeadPredictor(Predictor):
    """A trained CrossTune head as a job's "prompt": features of the inputs from the scorer, then the head."""

    def __init__(self, artifact: dict[str, Any]) -> None:
        self.artifact = artifact
        self.head = Head.from_json(artifact["head"])
        self.capability = Capability.FEATURES
        self.model_id = artifact["model_id"]
        self.description = describe(artifact, self.head)

    @classmethod
    def from_artifact(cls, artifact: dict[str, Any]) -> HeadPredictor:
        if artifact.get("method") != CrossTune.method or artifact.get("version") != ARTIFACT_VERSION:
            raise ValueError("not a CrossTune head artifact of a version this service reads")
        return cls(artifact)

    def requests(self, inputs: list[str]) -> list[FeatureRequest]:
        a = self.artifact
        return [
            FeatureRequest(feature_text(a["feature_input"], a["template"], a["instruction"], t), a["pooling"])
            for t in inputs
        ]

    async def probabilities(self, llm: Any, inputs: list[str]) -> np.ndarray:
        answers = await llm.features(self.requests(inputs))
        features = np.stack([f.array() for f in answers]) if answers else np.zeros((0, self.head.dim), np.float32)
        return self.head.probabilities(features)

    async def predict(self, llm: Any, task: Task, examples: list[Example]) -> list[str]:
        probs = await self.probabilities(llm, [ex.input for ex in examples])
        return [self.head.labels[i] for i in probs.argmax(axis=1)]


def describe(artifact: dict[str, Any], head: Head) -> str:
    """The text shown as `prompt` for a head: what it is, and a digest of its weights that names it."""
    trained = artifact["trained_on"]
    extra = f" + {trained['generated']} written" if trained.get("generated") else ""
    return (
        f"[crosstune head {head.digest()}: {head.hidden} wide, {head.heads} heads over {len(head.labels)} label "
        f"descriptions, trained on {trained['real']} examples{extra}; {artifact['pooling']} features of "
        f"{artifact['model_id']}]"
    )


class CrossTune(Optimizer):
    """Label-enhanced cross-attention over frozen features, no prompt search."""

    method: ClassVar[str] = "crosstune"
    params_model: ClassVar[type[MethodParams]] = CrossTuneParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.FEATURES})
    optimizer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.GENERATE})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER, "small": _SMALL}
    subset_purpose: ClassVar[int] = 800

    params: CrossTuneParams

    def __init__(self, params: CrossTuneParams, seed: int) -> None:
        super().__init__(params, seed)
        self.descriptions: dict[str, str] | None = None
        self.generated: list[dict[str, Any]] = []
        self.heads: list[dict[str, Any]] = []

    @property
    def total_steps(self) -> int:
        return 1

    @classmethod
    def text_candidate(cls, details: dict[str, Any]) -> bool:
        return False  # its candidates are described, not given, by their text

    @classmethod
    def prompt_from_artifact(cls, artifact: dict[str, Any]) -> HeadPredictor:
        return HeadPredictor.from_artifact(artifact)

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> list[tuple[list[str], str]]:
        return label_task_problems(task, "CrossTune trains a classifier over the task's labels")

    @classmethod
    def check_params(cls, params: MethodParams) -> list[tuple[list[str], str]]:
        hidden, heads = getattr(params, "hidden_size", 64), getattr(params, "heads", 4)
        if hidden % heads:
            return [(["heads"], f"heads ({heads}) must divide hidden_size ({hidden})")]
        return []

    @classmethod
    def check_split(cls, params: MethodParams, task: Task) -> list[tuple[list[str], str]]:
        problems = super().check_split(params, task)
        unknown = sorted(set(getattr(params, "label_descriptions", None) or {}) - set(task.labels or []))
        if unknown:
            problems.append((["label_descriptions"], f"descriptions of labels the task does not have: {unknown[:10]}"))
        return problems

    @classmethod
    def expected_calls(cls, params: CrossTuneParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        # The label count is not known here: the given descriptions', at least 2.
        s, labels = cls.scoring_set_size(params, n_train), max(2, len(params.label_descriptions or {}))
        written = labels if params.label_descriptions is None else 0
        augment = labels + labels * params.augment_per_label if params.augment_per_label else 0
        # Step 0 (the manual prompt on the scoring set and dev), descriptions, written examples, then the features
        # of the scoring set, dev, the descriptions and the written examples. The head's dev selection finds the
        # dev features in the cache.
        return (s + n_dev) + written + augment + (s + n_dev + labels)

    # -- step 1 -------------------------------------------------------------------------------------------

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        task = ctx.evaluator.task
        labels = list(task.labels or [])
        if not labels:
            raise ValueError("CrossTune needs a label task (metric label_accuracy with labels)")
        train = self.scoring_examples(ctx)
        dev = task.split_examples("dev")
        n, m, k = len(train), len(dev), len(labels)
        # The inputs' features (scorer) while the optimizer LLM writes descriptions and examples.
        jobs = [
            asyncio.create_task(self.features(ctx, [ex.input for ex in [*train, *dev]])),
            asyncio.create_task(self.describe_labels(ctx, labels, train)),
        ]
        if self.params.augment_per_label:
            jobs.append(asyncio.create_task(self.write_examples(ctx, labels, train)))
        try:
            inputs_x, descriptions, *written = await asyncio.gather(*jobs)
        except BaseException as exc:
            await settle(jobs, exc)
            raise
        self.generated = written[0] if written else []
        texts = [description_input(label, descriptions[label]) for label in labels]
        more_x = await self.features(ctx, texts + [g["input"] for g in self.generated])
        train_x, dev_x = inputs_x[:n], inputs_x[n : n + m]
        label_x, gen_x = more_x[:k], more_x[k:]
        train_y = np.array([labels.index(ex.target) for ex in train])
        dev_y = np.array([labels.index(ex.target) for ex in dev])
        model_id = ctx.evaluator.llm.info.model_id

        settings = HeadSettings(
            hidden=self.params.hidden_size,
            heads=self.params.heads,
            dropout=self.params.dropout,
            learning_rate=self.params.learning_rate,
            weight_decay=self.params.weight_decay,
            max_epochs=self.params.max_epochs,
            patience=self.params.patience,
            batch_size=self.params.batch_size,
        )
        seed = derived_seed(self.seed, _HEAD)
        head, report = await asyncio.to_thread(
            train_head, labels, label_x, train_x, train_y, dev_x, dev_y, settings, seed
        )
        artifact = self.artifact(ctx, model_id, descriptions, head, len(train), 0)
        candidates = [self.candidate(artifact, report, train_x, train_y, step, generated=0)]
        self.heads = [{"generated": 0, **report.as_dict()}]
        message = (
            f"{len(labels)} label descriptions ({len(self.params.label_descriptions or {})} given); features of "
            f"{n} train, {m} dev inputs; head: dev accuracy {_fmt(report.dev_accuracy)} at epoch {report.best_epoch}"
        )

        if self.generated:
            intended = [labels.index(g["label"]) for g in self.generated]
            if self.params.switch == "head":
                kept, confidence = augment.switch_by_head(head, gen_x, intended, self.params.switch_threshold)
            elif self.params.switch == "centroid":
                kept, confidence = augment.switch_by_centroid(train_x, train_y, gen_x, intended, k)
            else:
                kept, confidence = [True] * len(intended), [1.0] * len(intended)
            for entry, keep, value in zip(self.generated, kept, confidence, strict=True):
                entry["kept"], entry["confidence"] = bool(keep), round(value, 6)
            chosen = [i for i, keep in enumerate(kept) if keep]
            message += (
                f"; {len(self.generated)} examples written, {len(chosen)} kept by the {self.params.switch} switch"
            )
            if chosen:
                all_x = np.concatenate([train_x, gen_x[chosen]])
                all_y = np.concatenate([train_y, np.asarray(intended)[chosen]])
                augmented, aug_report = await asyncio.to_thread(
                    train_head, labels, label_x, all_x, all_y, dev_x, dev_y, settings, seed, reference=train_x
                )
                aug_artifact = self.artifact(ctx, model_id, descriptions, augmented, len(train), len(chosen))
                candidates.append(
                    self.candidate(aug_artifact, aug_report, train_x, train_y, step, generated=len(chosen))
                )
                self.heads.append({"generated": len(chosen), **aug_report.as_dict()})
                message += f"; augmented head: dev accuracy {_fmt(aug_report.dev_accuracy)}"
        # The head to select on dev: the better one during training (dev accuracy, else train), ties to real data.
        leader = max(range(len(candidates)), key=lambda i: (candidates[i].details["selection_accuracy"], -i))
        return StepReport(step, candidates, message=message, leader=leader)

    async def features(self, ctx: OptimizerContext, texts: list[str]) -> np.ndarray:
        """The scorer's features of `texts`, each in the input's place (`feature_input`), one row each."""
        task = ctx.evaluator.task
        requests = [
            FeatureRequest(
                feature_text(self.params.feature_input, task.template, ctx.initial_prompt, t), self.params.pooling
            )
            for t in texts
        ]
        answers = await ctx.evaluator.llm.features(requests)
        return np.stack([a.array() for a in answers]) if answers else np.zeros((0, 0), dtype=np.float32)

    async def describe_labels(self, ctx: OptimizerContext, labels: list[str], train: list[Example]) -> dict[str, str]:
        """The given descriptions, and one written by the optimizer LLM (greedy) for each other label."""
        if self.descriptions is not None and set(self.descriptions) >= set(labels):
            return self.descriptions
        given = dict(self.params.label_descriptions or {})
        missing = [label for label in labels if label not in given]
        requests = []
        for label in missing:
            own = [ex.input for ex in train if ex.target == label]
            rng = derived_rng(self.seed, _DESCRIBE, labels.index(label))
            shown = [own[i] for i in sorted(rng.permutation(len(own))[: self.params.describe_shots])] if own else []
            prompt = augment.description_prompt(ctx.initial_prompt, labels, label, shown)
            requests.append(GenerationRequest(prompt, max_tokens=self.params.description_max_tokens, temperature=0.0))
        answers = await ctx.optimizer_llm.generate(requests) if requests else []
        for label, answer in zip(missing, answers, strict=True):
            given[label] = augment.clean_description(answer.texts[0] if answer.texts else "", label)
        self.descriptions = {label: given[label] for label in labels}
        return self.descriptions

    async def write_examples(
        self, ctx: OptimizerContext, labels: list[str], train: list[Example]
    ) -> list[dict[str, Any]]:
        """`augment_per_label` new inputs per label from the optimizer LLM (seeded samples), without empty ones and
        repeats of a training input or of each other."""
        p = self.params
        targets = [ex.target for ex in train]
        requests = []
        for index, label in enumerate(labels):
            rng = derived_rng(self.seed, _AUGMENT, index)
            shown = [train[i] for i in augment.pick_shown(targets, labels, label, p.augment_shots, rng)]
            requests.append(
                GenerationRequest(
                    augment.augmentation_prompt(ctx.initial_prompt, labels, label, shown),
                    max_tokens=p.augment_max_tokens,
                    temperature=p.augment_temperature,
                    n=p.augment_per_label,
                    seed=derived_seed(self.seed, _AUGMENT, index),
                )
            )
        answers = await ctx.optimizer_llm.generate(requests)
        seen = {" ".join(ex.input.split()).lower() for ex in train}
        out = []
        for label, answer in zip(labels, answers, strict=True):
            for text in answer.texts:
                cleaned = augment.clean_generated(text)
                key = " ".join(cleaned.split()).lower()
                if len(key) < 3 or key in seen:
                    continue
                seen.add(key)
                out.append({"input": cleaned, "label": label})
        return out

    def artifact(
        self, ctx: OptimizerContext, model_id: str, descriptions: dict[str, str], head: Head, real: int, generated: int
    ) -> dict[str, Any]:
        return {
            "version": ARTIFACT_VERSION,
            "method": self.method,
            "model_id": model_id,
            "feature_input": self.params.feature_input,
            "pooling": self.params.pooling,
            "template": ctx.evaluator.task.template,
            "instruction": ctx.initial_prompt,
            "descriptions": dict(descriptions),
            "trained_on": {"real": real, "generated": generated},
            "head": head.to_json(),
        }

    def candidate(
        self, artifact: dict, report: Any, train_x: np.ndarray, train_y: np.ndarray, step: int, generated: int
    ) -> CandidateResult:
        # Scored through the artifact, so the numbers are those a later `predict` reproduces.
        predictor = HeadPredictor.from_artifact(artifact)
        accuracy = float((predictor.head.probabilities(train_x).argmax(axis=1) == train_y).mean())
        selection = report.dev_accuracy if report.dev_accuracy is not None else accuracy
        details = {"origin": "augmented" if generated else "head", "generated": generated, **report.as_dict()}
        details["selection_accuracy"] = selection
        return CandidateResult(
            predictor.description, accuracy, step, details, artifact=artifact, scoring_prompt=predictor
        )

    def _state(self) -> dict[str, Any]:
        return {"descriptions": self.descriptions, "generated": self.generated, "heads": self.heads}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.descriptions = state.get("descriptions")
        self.generated = list(state.get("generated") or [])
        self.heads = list(state.get("heads") or [])


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
