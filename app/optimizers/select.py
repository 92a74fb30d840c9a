"""`select`: choose among given prompts without labels, from the label probabilities the scorer gives them on
unlabeled inputs (probability-based prompt selection, Yang et al., TACL 2024).

Step 0 scores every candidate (the initial prompt first, then `candidates`) on the train inputs - targets are not
read - and computes every criterion below on the (prompts x inputs x labels) table of p(y|x,t), optionally
calibrated by marginalization first. It reports the initial prompt (the job's `initial`); step 1 reports the other
candidates and nominates the chosen criterion's choice. The method's objectives make that choice the job's best:
the train objective is the chosen criterion's value and the dev objective is constant, so dev (often absent: an
unlabeled dataset) cannot overturn a label-free choice.

The criteria, for a prompt t with P_t = p(.|x,t) over the inputs x (H: entropy, natural log):

- mi:  H(mean_x P_t) - mean_x H(P_t)                                       (higher wins)
- ge:  H(share of inputs whose argmax is each label)                         (higher wins)
- mdl: -mean_x H(P_t)                                                        (higher wins)
- le:  mean_x H(P_t)                                                         (higher wins)
- zlp / zpm / zmv: share of inputs where t's argmax equals a pseudo-label from all the prompts together:
  argmax_y sum_t log p(y|x,t) / argmax_y sum_t p(y|x,t) / the majority of their argmaxes (higher wins)
- ppl: -mean_x log sum_y p_raw(y|x,t), the log-perplexity of the answer slot: how little probability the model
  puts on the label words at all (raw, before the softmax over labels and any calibration; lower wins)

Ties go to the earlier candidate. Where the train inputs have targets, each candidate's train accuracy (its argmax
after the task's own calibration, the evaluator's rule) is reported too, so the criteria can be compared.

Pure functions first (tested against hand-computed values), the optimizer after.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.evaluation.calibration import argmax_labels, cbm, label_distribution
from app.evaluation.evaluator import LabelTable, PromptScore
from app.evaluation.task import Example, Task
from app.llm.port import Capability
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    StepReport,
    label_task_problems,
    train_subset_field,
)

Criterion = Literal["mi", "ge", "mdl", "le", "zlp", "zpm", "zmv", "ppl"]
CRITERIA: tuple[str, ...] = ("mi", "ge", "mdl", "le", "zlp", "zpm", "zmv", "ppl")
# Which way each criterion's value points: True where a higher value wins.
HIGHER_WINS: dict[str, bool] = {name: name != "ppl" for name in CRITERIA}
# Probabilities below this count as this inside a logarithm (zlp's sum of log-probs).
_TINY = 1e-300


# ----------------------------------------------------------------------------------------------------------
# Criteria as pure functions of the probability table


def entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy (nats) along the last axis, with 0 log 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    logs = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=-1)


def pseudo_labels(probs: np.ndarray, kind: str) -> np.ndarray:
    """Per input, the label the prompts agree on (`probs`: prompts x inputs x labels; ties: the first label):
    "zlp" the largest sum of log-probs, "zpm" the largest sum of probabilities, "zmv" the most argmaxes."""
    probs = np.asarray(probs, dtype=np.float64)
    if kind == "zlp":
        votes = np.log(np.maximum(probs, _TINY)).sum(axis=0)
    elif kind == "zpm":
        votes = probs.sum(axis=0)
    elif kind == "zmv":
        n_labels = probs.shape[2]
        votes = np.eye(n_labels)[probs.argmax(axis=2)].sum(axis=0)
    else:
        raise ValueError(f"no pseudo-labels of kind {kind!r}")
    return votes.argmax(axis=1)


def label_mass_logs(logprobs: np.ndarray) -> np.ndarray:
    """log sum_y p_raw(y|x,t) from raw label log-probs (prompts x inputs x labels): how much probability the model
    puts on the label words at all. Unseen words (-inf, the cache's -1e9 floor) add nothing."""
    lp = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=-1e9, neginf=-1e9, posinf=0.0)
    top = lp.max(axis=2, keepdims=True)
    return (top + np.log(np.exp(lp - top).sum(axis=2, keepdims=True)))[..., 0]


def criterion_values(probs: np.ndarray, logprobs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every criterion's value per prompt. `probs`: p(y|x,t), prompts x inputs x labels (rows sum to 1), already
    calibrated if wanted; `logprobs`: the raw label log-probs of the same shape (for ppl; without them ppl is 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 3 or probs.shape[1] == 0:
        raise ValueError("criteria need a prompts x inputs x labels table with at least one input")
    conditional = entropy(probs).mean(axis=1)
    predicted = probs.argmax(axis=2)
    shares = np.eye(probs.shape[2])[predicted].mean(axis=1)
    values = {
        "mi": entropy(probs.mean(axis=1)) - conditional,
        "ge": entropy(shares),
        "mdl": -conditional,
        "le": conditional,
    }
    for kind in ("zlp", "zpm", "zmv"):
        values[kind] = (predicted == pseudo_labels(probs, kind)[None, :]).mean(axis=1)
    values["ppl"] = np.zeros(probs.shape[0]) if logprobs is None else -label_mass_logs(logprobs).mean(axis=1)
    return values


def ranking(values: Sequence[float], higher_wins: bool) -> list[int]:
    """Prompt indices from the criterion's first choice to its last (ties: the earlier prompt)."""
    sign = -1.0 if higher_wins else 1.0
    return sorted(range(len(values)), key=lambda i: (sign * float(values[i]), i))


def oriented(value: float, criterion: str) -> float:
    """A criterion's value turned so that higher wins (the method's train objective)."""
    return float(value) if HIGHER_WINS[criterion] else -float(value)


# ----------------------------------------------------------------------------------------------------------
# The method


class CandidateSource(BaseModel):
    """An earlier job whose best text candidates join `candidates` when the job is submitted."""

    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(max_length=64, description="A job of the same tenant, in any state.")
    top: int = Field(
        10,
        ge=1,
        le=1000,
        description="How many of its candidates: distinct text prompts, by dev score where it was measured, then by "
        "train score.",
    )


MAX_CANDIDATES = 1000


class SelectParams(MethodParams):
    candidates: list[Annotated[str, Field(max_length=200_000)]] = Field(
        default_factory=list,
        max_length=MAX_CANDIDATES,
        description="The prompts to choose among, besides the initial prompt (which is always a candidate, the "
        "first). Duplicates are scored once. At least one is needed, here or from `from_jobs`.",
    )
    from_jobs: list[CandidateSource] = Field(
        default_factory=list,
        max_length=50,
        description="Earlier jobs whose candidates are added to `candidates` on submission (the stored job lists "
        "them): their `top` distinct text prompts each. Soft prompts, CrossTune heads and per-input "
        "demonstrations are not text and are skipped.",
    )
    criterion: Criterion = Field(
        "mi",
        description="The label-free criterion that picks the job's best prompt: mi (mutual information), ge (global "
        "entropy), mdl (minimum description length), le (local entropy), zlp / zpm / zmv (agreement with the "
        "prompts' log-prob-sum / probability-sum / majority-vote pseudo-labels), ppl (answer-slot perplexity). "
        "Every criterion is computed and reported; this one decides.",
    )
    calibration: Literal["none", "cbm"] = Field(
        "none",
        description="Calibration of p(label|input) before the criteria: none, or cbm (calibration by "
        "marginalization: divided by its mean over the scored inputs, renormalized). Predictions (accuracy, dev, "
        "test) follow `task.calibration` instead.",
    )
    train_subset: int | None = train_subset_field("unlabeled_subset")


def _rounded(value: float) -> float:
    return round(float(value), 6)


def _excerpt(prompt: str, limit: int = 60) -> str:
    text = " ".join(prompt.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


class Select(Optimizer):
    """Probability-based prompt selection among given candidates, without labels."""

    method: ClassVar[str] = "select"
    params_model: ClassVar[type[MethodParams]] = SelectParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.LABEL_LOGPROBS})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"calibrated": {"criterion": "mi", "calibration": "cbm"}}
    subset_purpose: ClassVar[int] = 601
    # Train examples may be unlabeled (empty targets): the criteria never read them.
    accepts_unlabeled: ClassVar[bool] = True

    params: SelectParams

    def __init__(self, params: SelectParams, seed: int) -> None:
        super().__init__(params, seed)
        # After step 0: per candidate (initial first), {"prompt", "score", "details"}.
        self.results: list[dict[str, Any]] | None = None

    @property
    def total_steps(self) -> int:
        return 1

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> list[tuple[list[str], str]]:
        return label_task_problems(task, "select compares the label probabilities of its candidates")

    @classmethod
    def check_params(cls, params: MethodParams) -> list[tuple[list[str], str]]:
        if not getattr(params, "candidates", None):
            return [
                (
                    ["candidates"],
                    "select needs at least one candidate prompt besides the initial prompt (in candidates, or from "
                    "from_jobs)",
                )
            ]
        return []

    @classmethod
    def expected_calls(cls, params: SelectParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        # Every candidate on the scoring set, then at most two dev scorings (the initial prompt, the choice).
        return (1 + len(params.candidates)) * cls.scoring_set_size(params, n_train) + 2 * n_dev

    @classmethod
    def initial_calls(cls, params: SelectParams, n_train: int, n_dev: int) -> int:
        # Step 0 scores every candidate, not only the initial prompt.
        return (1 + len(params.candidates)) * cls.scoring_set_size(params, n_train) + n_dev

    @classmethod
    def train_objective(cls, candidate: CandidateResult) -> float:
        return float(candidate.details["objective"])

    @classmethod
    def dev_objective(cls, score: PromptScore, task: Task, examples: list[Example]) -> float:
        # The label-free choice stands: dev decides nothing (the train objective does, ties to the earlier prompt).
        return 0.0

    def prompts(self, initial_prompt: str) -> list[str]:
        """The candidates in order, the initial prompt first, each text once."""
        return list(dict.fromkeys([initial_prompt, *self.params.candidates]))

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        examples = self.scoring_examples(ctx)
        prompts = self.prompts(ctx.initial_prompt)
        tables = await ctx.evaluator.label_tables(prompts, examples)
        self.results = self.assess(prompts, tables, examples, ctx.evaluator.task.labels or [])
        chosen = next(i for i, r in enumerate(self.results) if r["details"]["selected"])
        message = (
            f"{len(prompts)} prompts scored on {len(examples)} train inputs; {self.params.criterion}"
            f"{' (cbm)' if self.params.calibration == 'cbm' else ''} chose candidate {chosen}: "
            f"{_excerpt(prompts[chosen])}"
        )
        summary = self.results[chosen]["details"].get("choices")
        if summary is not None and self.results[chosen]["details"]["train_accuracy"] is not None:
            accuracies = ", ".join(
                f"{name} {entry['train_accuracy']:.3f}" for name, entry in summary["criteria"].items()
            )
            message += f"; train accuracy of each criterion's choice: {accuracies} (oracle {summary['oracle']:.3f})"
        return StepReport(0, [self._candidate(0, 0)], message=message, leader=0)

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        if self.results is None:
            raise RuntimeError("select: step 1 needs step 0's scores")
        candidates = [self._candidate(i, 1) for i in range(1, len(self.results))]
        chosen = [i for i, c in enumerate(candidates) if c.details["selected"]]
        # When the initial prompt is the choice (step 0 made it the best), no other candidate is to be selected.
        return StepReport(
            1,
            candidates,
            message=f"{len(candidates)} other candidates reported",
            leader=chosen[0] if chosen else None,
            select=bool(chosen),
        )

    def _candidate(self, index: int, step: int) -> CandidateResult:
        assert self.results is not None
        result = self.results[index]
        return CandidateResult(result["prompt"], result["score"], step, details=dict(result["details"]))

    def assess(
        self, prompts: list[str], tables: list[LabelTable], examples: list[Example], labels: list[str]
    ) -> list[dict[str, Any]]:
        """Every criterion, rank and choice per prompt, and the train accuracy where targets exist."""
        logprobs = np.asarray([table.logprobs for table in tables], dtype=np.float64)
        probs = np.stack([label_distribution(table.logprobs) for table in tables])
        if self.params.calibration == "cbm":
            probs = np.stack([cbm(p) for p in probs])
        values = criterion_values(probs, logprobs)
        orders = {name: ranking(values[name], HIGHER_WINS[name]) for name in CRITERIA}
        choice = {name: order[0] for name, order in orders.items()}

        gold = {label: i for i, label in enumerate(labels)}
        labeled = [j for j, ex in enumerate(examples) if ex.target in gold]
        accuracy: list[float | None] = []
        for table in tables:
            if not labeled:
                accuracy.append(None)
                continue
            predicted = argmax_labels(table.probs)
            accuracy.append(sum(predicted[j] == gold[examples[j].target] for j in labeled) / len(labeled))

        criterion = self.params.criterion
        results = []
        for i, prompt in enumerate(prompts):
            ranks = {name: orders[name].index(i) + 1 for name in CRITERIA}
            details: dict[str, Any] = {
                "origin": "initial" if i == 0 else "candidate",
                "index": i,
                "criterion": criterion,
                "calibration": self.params.calibration,
                "criteria": {name: {"value": _rounded(values[name][i]), "rank": ranks[name]} for name in CRITERIA},
                "chosen_by": [name for name in CRITERIA if choice[name] == i],
                "selected": choice[criterion] == i,
                "objective": oriented(values[criterion][i], criterion),
                "train_accuracy": accuracy[i],
                "labeled_inputs": len(labeled),
            }
            if choice[criterion] == i:
                details["choices"] = {
                    "criteria": {
                        name: {"index": choice[name], "train_accuracy": accuracy[choice[name]]} for name in CRITERIA
                    },
                    "oracle": max((a for a in accuracy if a is not None), default=None),
                }
            results.append({"prompt": prompt, "score": accuracy[i] or 0.0, "details": details})
        return results

    def _state(self) -> dict[str, Any]:
        return {"results": self.results}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.results = state.get("results")
