"""Job payloads. `JobCreate` is discriminated by `method`; each method brings its own params model."""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model, field_validator, model_validator

from app.evaluation.evaluator import JUDGE_METRIC
from app.evaluation.metrics import METRICS
from app.evaluation.templates import INPUT_SLOT, PROMPT_SLOT
from app.optimizers.registry import METHODS

MetricName = Literal[
    "exact_match",
    "contains",
    "label_accuracy",
    "numeric",
    "f1",
    "answer_match",
    "regex",
    "json_schema",
    "set_match",
    "llm_judge",
]
assert set(MetricName.__args__) == {*METRICS, JUDGE_METRIC}  # type: ignore[attr-defined]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeIn(Strict):
    """The `llm_judge` metric: `backend` grades each output (given the input and the target as a reference) by the
    `rubric`, on a scale from `scale_min` to `scale_max`; the grade, rescaled to [0, 1], is the example's score."""

    rubric: str = Field(..., min_length=1, max_length=20_000)
    backend: str = Field("default", max_length=64, description="Needs `generate`.")
    scale_min: int = Field(1, ge=0, le=100)
    scale_max: int = Field(10, ge=1, le=100)
    max_tokens: int = Field(16, ge=1, le=256, description="For the grade reply.")

    @model_validator(mode="after")
    def _scale(self) -> JudgeIn:
        if self.scale_max <= self.scale_min:
            raise ValueError("scale_max must be above scale_min")
        return self


class SplitIn(Strict):
    """How the dataset is split. `fraction`: shuffled by the fractions. `k_shot`: stratified, `train_per_class` and
    `dev_per_class` examples of each class (target value) with the rest for test; label tasks only."""

    kind: Literal["fraction", "k_shot"] = "fraction"
    train: float = Field(0.5, gt=0, le=1, description="fraction: the share for train")
    dev: float = Field(0.25, ge=0, le=1, description="fraction: the share for dev")
    test: float = Field(0.25, ge=0, le=1, description="fraction: the share for test (0 with `test_dataset`)")
    train_per_class: int | None = Field(None, ge=1, le=10_000, description="k_shot: train examples per class")
    dev_per_class: int | None = Field(
        None, ge=0, le=10_000, description="k_shot: dev examples per class (default: `train_per_class`)"
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _k_shot_sizes(self) -> SplitIn:
        if self.kind == "k_shot" and self.train_per_class is None:
            raise ValueError("a k_shot split needs train_per_class")
        if self.kind == "fraction" and (self.train_per_class is not None or self.dev_per_class is not None):
            raise ValueError("train_per_class and dev_per_class apply to kind 'k_shot'")
        return self


class TaskIn(Strict):
    dataset: str = Field(..., min_length=1, max_length=200, description="A dataset id or `builtin:<name>`.")
    test_dataset: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Another dataset (id or `builtin:<name>`) as the held-out test set; `dataset` then gives only "
        "train and dev.",
    )
    template: str | None = Field(
        None,
        max_length=200_000,
        description="Text with `{prompt}` and `{input}`; default: the builtin task's template.",
    )
    metric: MetricName | None = None
    labels: list[Annotated[str, Field(min_length=1, max_length=1_000)]] | None = Field(
        None, min_length=2, max_length=10_000
    )
    verbalizer: (
        dict[
            str,
            Annotated[str, Field(max_length=1_000)]
            | Annotated[list[Annotated[str, Field(max_length=1_000)]], Field(min_length=1, max_length=64)],
        ]
        | None
    ) = Field(
        None,
        description="label -> the text whose first token is scored (default: a space plus the label), or a list "
        "of such texts (a verbalizer ensemble: the label's log-prob is the mean of theirs).",
    )
    split: SplitIn = Field(default_factory=SplitIn)
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    judge: JudgeIn | None = Field(None, description="Settings of the `llm_judge` metric (required by it).")
    calibration: Literal["none", "cbm", "contextual"] = Field(
        "none",
        description="Label tasks scored by label log-probs: how p(label|input) is calibrated before the argmax. "
        "`cbm`: divided by its mean over the inputs scored together (a split, or the job's train split for "
        'predict), renormalized; `contextual`: divided by p(label|"N/A") for the same prompt (one more request '
        "per prompt), renormalized.",
    )

    demo_template: str | None = Field(
        None,
        max_length=200_000,
        description="How a training example is shown as a demonstration (method `fewshot`, or `params.demonstrations` "
        "of opro, apo, plum and evaluate): a text with `{input}` and `{target}` (a label task's target: its first "
        "verbalizer text, stripped). Default: the template's query with an empty `{prompt}`, then the answer as it "
        "is scored.",
    )
    demo_max_chars: int = Field(
        150, ge=1, le=200_000, description="A demonstration's input is cut to this many characters."
    )

    @field_validator("demo_template")
    @classmethod
    def _demo_slots(cls, value: str | None) -> str | None:
        if value is not None:
            missing = [slot for slot in ("{input}", "{target}") if slot not in value]
            if missing:
                raise ValueError(f"demo_template must contain {' and '.join(missing)}")
        return value

    @field_validator("template")
    @classmethod
    def _slots(cls, value: str | None) -> str | None:
        if value is not None:
            missing = [slot for slot in (PROMPT_SLOT, INPUT_SLOT) if slot not in value]
            if missing:
                raise ValueError(f"template must contain {' and '.join(missing)}")
        return value

    @model_validator(mode="after")
    def _verbalizer_keys(self) -> TaskIn:
        if self.verbalizer is not None:
            if self.labels is None:
                raise ValueError("verbalizer needs labels")
            unknown = sorted(set(self.verbalizer) - set(self.labels))
            if unknown:
                raise ValueError(f"verbalizer keys {unknown} are not labels; allowed: {self.labels}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self


class BackendsIn(Strict):
    scorer: str = Field("default", max_length=64, description="Backend that runs the prompt being optimized.")
    optimizer: str = Field("default", max_length=64, description="Backend that proposes / edits prompts.")


class BudgetIn(Strict):
    max_llm_calls: int | None = Field(2000, ge=1, description="Hard cap on LLM requests (cache hits are free).")
    max_tokens: int | None = Field(None, ge=1, description="Hard cap on prompt + completion tokens.")
    max_seconds: float | None = Field(None, gt=0, description="Hard cap on wall time across attempts.")
    max_cost: float | None = Field(
        None, gt=0, description="Hard cap on money, from the backends' prices (a backend without one is free)."
    )


class WebhookIn(Strict):
    url: str = Field(..., min_length=1, max_length=2000, description="Must match `webhooks.allowed_destinations`.")
    events: list[Literal["terminal", "step"]] = Field(
        default_factory=lambda: ["terminal"],
        min_length=1,
        max_length=2,
        description='"terminal": the job\'s end; "step": each finished step too.',
    )


class JobCreateBase(Strict):
    task: TaskIn
    initial_prompt: str | None = Field(None, max_length=200_000, description="Default: the builtin task's prompt.")
    backends: BackendsIn = Field(default_factory=BackendsIn)
    budget: BudgetIn = Field(default_factory=BudgetIn)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    webhook: WebhookIn | None = Field(
        None, description="Tell this URL of the job's end (and steps); signed, retried, logged. Default: the tenant's."
    )


def _apply_preset(method_cls):
    def apply(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("params"), dict) and "preset" in data["params"]:
            params = dict(data["params"])
            preset = params.pop("preset")
            if preset not in method_cls.presets:
                raise ValueError(f"params.preset: unknown preset {preset!r}; allowed: {sorted(method_cls.presets)}")
            data = {**data, "params": {**method_cls.presets[preset], **params}}
        return data

    return model_validator(mode="before")(apply)


def method_models(base: type[BaseModel], suffix: str) -> dict[str, type[BaseModel]]:
    """`base` extended, for each method, with `method` (its name) and `params` (its parameter model)."""
    models = {}
    for name, method_cls in METHODS.items():
        models[name] = create_model(
            f"{method_cls.__name__}{suffix}",
            __base__=base,
            __validators__={"_preset": _apply_preset(method_cls)},
            method=(Literal[name], ...),
            params=(method_cls.params_model, Field(default_factory=method_cls.params_model)),
        )
    return models


def discriminated_by_method(models: dict[str, type[BaseModel]]) -> Any:
    return Annotated[Union[tuple(models.values())], Field(discriminator="method")]  # noqa: UP007


@cache
def job_create_models() -> dict[str, type[JobCreateBase]]:
    return method_models(JobCreateBase, "JobCreate")  # type: ignore[return-value]


@cache
def job_create_type() -> Any:
    """The request body type of POST /v1/jobs: one model per method, discriminated by `method`."""
    return discriminated_by_method(job_create_models())


def normalize_job_error(err: dict) -> dict:
    """Make errors from the method-discriminated union read like plain field errors: drop the method tag
    pydantic puts into `loc`, and report a missing or unknown method at `body.method` with the allowed ones."""
    loc = list(err.get("loc", ()))
    if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
        ctx = {**(err.get("ctx") or {}), "expected": ", ".join(repr(m) for m in METHODS)}
        message = f"method must be one of: {', '.join(METHODS)}"
        return {**err, "loc": (*loc, "method"), "msg": message, "ctx": ctx}
    # The union's tag follows the body (a job) or a list index (a study's arm).
    tagged = [
        i for i in range(1, len(loc)) if loc[i] in METHODS and (loc[i - 1] == "body" or isinstance(loc[i - 1], int))
    ]
    if tagged:
        return {**err, "loc": tuple(p for i, p in enumerate(loc) if i != tagged[0])}
    return err


@cache
def job_create_adapter() -> TypeAdapter:
    return TypeAdapter(job_create_type())


class PredictIn(Strict):
    inputs: list[Annotated[str, Field(max_length=100_000)]] = Field(..., min_length=1, max_length=10_000)
    use: Literal["best", "initial"] = "best"
    backend: str | None = Field(
        None,
        max_length=64,
        description="Backend to predict with (default: the job's scorer); a soft prompt needs the same model.",
    )
