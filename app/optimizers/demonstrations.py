"""Carrying one demonstration set through a text method (`params.demonstrations` of opro, apo, plum and evaluate).

The method keeps editing the instruction only: it sees, remembers and shows its optimizer LLM instructions, while
every prompt it has scored carries the same demonstrations (`app.evaluation.demonstrations`). Two pieces do it:

* `CarryingEvaluator` stands in for the evaluator during the method's steps: each instruction it is asked to score
  becomes a `FixedDemonstrations` prompt named by the instruction, so the method's results come back under the names
  it gave, and an example scored that is itself a demonstration is scored without it. `render` stays plain: a
  meta-prompt shows a query as the task frames it, not the demonstration block.
* `decorate` turns the step's candidates into the prompts that were scored: `prompt` is the whole {prompt} text
  (instruction and demonstrations), which the engine scores on dev and test and `predict` applies as it is, and
  `details` record the `instruction` and the `demonstrations` (train-split positions, in the order shown).

The set is drawn once per job from the train split - stratified, `k_per_class` of each label (`random`, seeded by
`seed` or the job's seed) - given as train positions (`fixed`), or searched (`search`: `sets` such draws are scored
with the initial instruction on the method's scoring set before its first step, and the best is carried; see
`Optimizer.search_demonstrations`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.evaluation.demonstrations import (
    Demonstration,
    FixedDemonstrations,
    check_positions,
    compose,
    demonstrations_of,
    pick_demonstrations,
)
from app.evaluation.evaluator import Prompt, PromptScore
from app.evaluation.task import Example, Task

Layout = Literal["demonstrations_first", "instruction_first"]
LAYOUT_DESCRIPTION = (
    "Where the instruction goes: after the demonstrations ('demonstrations_first': the shared block leads every "
    "prompt, for prefix caching) or before them ('instruction_first')."
)


class DemonstrationsParams(BaseModel):
    """Train examples every scored prompt carries; the method edits only the instruction."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["random", "fixed", "search"] = Field(
        "random",
        description="'random': a seeded stratified draw of `k_per_class` train examples per label (a generation "
        "task: `k_per_class` in all); 'fixed': the train-split `positions` given; 'search': `sets` such draws, each "
        "scored with the initial instruction on the scoring set before the method starts, the best carried.",
    )
    k_per_class: int = Field(1, ge=1, le=64, description="'random' and 'search': demonstrations per label.")
    sets: int = Field(
        4,
        ge=2,
        le=32,
        description="'search': stratified random sets compared at step 0 (each costs one scoring of the initial "
        "instruction on the scoring set).",
    )
    positions: list[int] | None = Field(
        None, min_length=1, max_length=512, description="'fixed': train-split positions, in the order shown."
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="'random' and 'search': the draws' seed (default: the job's)."
    )
    layout: Layout = Field("demonstrations_first", description=LAYOUT_DESCRIPTION)

    @model_validator(mode="after")
    def _positions(self) -> DemonstrationsParams:
        if self.strategy == "fixed" and not self.positions:
            raise ValueError("strategy 'fixed' needs positions (train-split positions)")
        if self.strategy != "fixed" and self.positions is not None:
            raise ValueError("positions go with strategy 'fixed'")
        return self


def demonstrations_field() -> Any:
    return Field(
        None,
        description="Carry a fixed set of train examples as demonstrations in every scored prompt; the method edits "
        "only the instruction (docs/methods/fewshot.md).",
    )


def set_size(spec: DemonstrationsParams, task: Task) -> int:
    """Demonstrations in a drawn set: `k_per_class` per label (a generation task: `k_per_class`)."""
    return spec.k_per_class * (len(task.labels) if task.labels else 1)


def draw(spec: DemonstrationsParams, task: Task, seed: int) -> list[int]:
    """A seeded stratified draw of `set_size` train-split positions, in the order shown."""
    targets = [ex.target for ex in task.split_examples("train")]
    return pick_demonstrations(targets, task.labels if task.labels else None, set_size(spec, task), seed)


def resolve_positions(spec: DemonstrationsParams, task: Task, job_seed: int) -> list[int]:
    """The train-split positions of a fixed or random carried set, in the order shown ('search' chooses its set by
    scoring, in `Optimizer.search_demonstrations`)."""
    n_train = len(task.split_examples("train"))
    if spec.strategy == "fixed":
        problem = check_positions(spec.positions or [], n_train)
        if problem is not None:
            raise ValueError(problem)
        return list(spec.positions or [])
    if spec.strategy == "search":
        raise ValueError("a searched demonstration set is chosen by scoring, not drawn")
    return draw(spec, task, job_seed if spec.seed is None else spec.seed)


def search_calls(params: Any, scoring_size: int) -> int:
    """LLM calls a 'search' strategy makes before the method starts (0 for any other)."""
    spec = carried_spec(params)
    return spec.sets * scoring_size if spec is not None and spec.strategy == "search" else 0


def carried_spec(params: Any) -> DemonstrationsParams | None:
    """A method's `params.demonstrations` when it is a carried set (BBT's own `demonstrations` is a count)."""
    spec = getattr(params, "demonstrations", None)
    return spec if isinstance(spec, DemonstrationsParams) else None


def split_problems(spec: DemonstrationsParams | None, n_train: int) -> list[tuple[list[str], str]]:
    if spec is None or spec.strategy != "fixed":
        return []
    problem = check_positions(spec.positions or [], n_train)
    return [] if problem is None else [(["demonstrations", "positions"], problem)]


class CarriedDemonstrations:
    """One job's carried demonstration set."""

    def __init__(
        self, spec: DemonstrationsParams, task: Task, job_seed: int, positions: list[int] | None = None
    ) -> None:
        self.layout = spec.layout
        if positions is None:
            positions = resolve_positions(spec, task, job_seed)
        self.demonstrations: list[Demonstration] = demonstrations_of(task, positions)

    @property
    def positions(self) -> list[int]:
        return [d.position for d in self.demonstrations]

    def block(self) -> str:
        """The demonstrations as they sit in every prompt (without the instruction)."""
        return compose("", [d.text for d in self.demonstrations], self.layout)

    def prompt(self, instruction: str) -> FixedDemonstrations:
        return FixedDemonstrations(instruction, self.demonstrations, self.layout, description=instruction)

    def text(self, instruction: str) -> str:
        return compose(instruction, [d.text for d in self.demonstrations], self.layout)

    def decorate(self, candidates: list[Any]) -> None:
        """Make each candidate the prompt that was scored; its details name the instruction and the demonstrations."""
        for candidate in candidates:
            if "demonstrations" in candidate.details:
                continue
            instruction = candidate.prompt
            candidate.prompt = self.text(instruction)
            candidate.details = {**candidate.details, "instruction": instruction, "demonstrations": self.positions}


class CarryingEvaluator:
    """The evaluator as a method carrying demonstrations sees it (see the module's docstring); anything else is the
    wrapped evaluator's."""

    def __init__(self, inner: Any, carried: CarriedDemonstrations) -> None:
        self._inner = inner
        self._carried = carried

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _wrap(self, prompts: list[Prompt]) -> list[Prompt]:
        return [self._carried.prompt(p) if isinstance(p, str) else p for p in prompts]

    async def score(
        self, prompts: list[Prompt], split: str = "train", examples: list[Example] | None = None
    ) -> list[PromptScore]:
        return await self._inner.score(self._wrap(prompts), split, examples)

    async def label_logprobs(self, prompts: list[Prompt], examples: list[Example]) -> list[list[list[float]]]:
        return await self._inner.label_logprobs(self._wrap(prompts), examples)

    async def label_tables(self, prompts: list[Prompt], examples: list[Example], reference=None):
        return await self._inner.label_tables(self._wrap(prompts), examples, reference)

    async def predict(self, prompts: list[Prompt], examples: list[Example], reference=None) -> list[list[str]]:
        return await self._inner.predict(self._wrap(prompts), examples, reference)
