"""The optimizer contract.

Every method has one shape: `step(ctx)` runs the next step and returns a `StepReport`. Step 0 is
`initial_step` (by default: score the initial prompt on the scoring set); every later step is the method's
`search_step`, which proposes candidates (possibly through the optimizer LLM), has them scored by the
evaluator and updates the method's search state. Between steps the whole state is `state_dict()` - plain
JSON - and all randomness comes from generators derived from (job seed, purpose, step), so a worker can
resume a job anywhere and replay it exactly.

The job engine (`app/jobs/engine.py`) picks the job's best prompt among the candidates a method marks
eligible, by the method's `dev_objective` on the dev split; docs/methods/ describes each method's rule.

Optimizers import nothing from FastAPI, SQLAlchemy, Redis or SAQ.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from app.evaluation.demonstrations import FixedDemonstrations, demonstrations_of, longest_block
from app.evaluation.evaluator import Evaluator, Prompt, PromptScore
from app.evaluation.task import Example, Task
from app.llm.metered import MeteredLLM
from app.llm.port import Capability
from app.optimizers.demonstrations import (
    CarriedDemonstrations,
    CarryingEvaluator,
    DemonstrationsParams,
    carried_spec,
    draw,
    search_calls,
    set_size,
    split_problems,
)


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


def train_subset_field(*former_names: str, default: int | None = None) -> Any:
    """The one parameter every method uses for "score on a fixed, seeded subset of the train split".
    `former_names` are the names a method used before, still accepted so stored job specs keep validating."""
    return Field(
        default,
        ge=1,
        validation_alias=AliasChoices("train_subset", *former_names),
        description="Score candidates on a fixed, seeded subset of this many training examples "
        "(None: the whole train split).",
    )


@dataclass(slots=True)
class CandidateResult:
    # The text prompt, or (soft prompts) a description of the artifact that names it uniquely.
    prompt: str
    # Score on the optimizer's scoring set (the train split), 0..1.
    score: float
    step: int
    details: dict[str, Any] = field(default_factory=dict)
    # Soft prompts only: the JSON artifact (`Optimizer.prompt_from_artifact` rebuilds the prompt from it) and the
    # prompt itself, ready to score. Stored only if the candidate becomes the job's best.
    artifact: dict[str, Any] | None = None
    scoring_prompt: Prompt | None = None
    # False for candidates that are reference points of the search, not its outputs (e.g. ClaPS's pruning
    # words and the empty prompt): the engine never returns them as the job's best.
    eligible: bool = True


@dataclass(slots=True)
class ScoredPrompt:
    """What a method remembers of a prompt it scored: its own objective, the task score, the step."""

    objective: float
    score: float
    step: int

    def to_json(self) -> list[float]:
        return [self.objective, self.score, self.step]

    @classmethod
    def from_json(cls, value: list[float]) -> ScoredPrompt:
        objective, score, step = value
        return cls(float(objective), float(score), int(step))


@dataclass(slots=True)
class StepReport:
    step: int
    candidates: list[CandidateResult]
    message: str | None = None
    # Index of the candidate the engine should consider for model selection (default: the eligible candidate
    # with the highest score). Must point at an eligible candidate.
    leader: int | None = None
    # False: no model selection after this step (a method that selects on dev only every so often).
    select: bool = True


@dataclass(slots=True)
class OptimizerContext:
    """Everything an optimizer may touch."""

    evaluator: Evaluator
    optimizer_llm: MeteredLLM
    initial_prompt: str


def instruction_hash(instruction: str) -> str:
    """MD5 of an instruction: the de-duplication key of the text methods (and of candidate rows)."""
    return hashlib.md5(instruction.encode("utf-8")).hexdigest()


class SeenInstructions:
    """MD5s of every instruction a text method has scored (or ruled out), in first-seen order.

    Serialised as the plain list of hashes; membership checks use a set kept beside it."""

    def __init__(self, hashes: list[str] | None = None) -> None:
        self._order: list[str] = []
        self._set: set[str] = set()
        for digest in hashes or ():
            self.add_hash(digest)

    def add_hash(self, digest: str) -> None:
        if digest not in self._set:
            self._set.add(digest)
            self._order.append(digest)

    def add(self, instruction: str) -> None:
        self.add_hash(instruction_hash(instruction))

    def __contains__(self, digest: str) -> bool:
        return digest in self._set

    def hashes(self) -> set[str]:
        """A copy of the set, for checks that also track this step's own proposals."""
        return set(self._set)

    def to_list(self) -> list[str]:
        return list(self._order)


def _seed_entropy(seed: int) -> int:
    return int(seed) % (2**63)


# Key of the carried demonstration search's draws (other purposes use their own keys).
_SEED_DEMONSTRATION_SEARCH = 91


def derived_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator that depends only on (job seed, keys) - never on what ran before - so a resumed step
    replays exactly."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([_seed_entropy(seed), *keys])))


def derived_seed(seed: int, *keys: int) -> int:
    """A 31-bit sampling seed (safe for any API) that depends only on (job seed, keys): seeded optimizer
    requests are deterministic, hence cacheable, and a resumed step re-uses their answers."""
    state = np.random.SeedSequence([_seed_entropy(seed), *keys]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def subset_positions(n: int, size: int | None, seed: int, *keys: int) -> list[int]:
    """Sorted positions of a fixed subset of `size` of `n` items, drawn from (job seed, keys); all of them when
    `size` is None or not smaller than `n`. The scoring set of methods that optimise on part of the train split."""
    if size is None or size >= n:
        return list(range(n))
    picked = derived_rng(seed, *keys).choice(n, size=size, replace=False)
    return sorted(int(i) for i in picked)


def label_task_problems(task: dict[str, Any], needs: str) -> list[tuple[list[str], str]]:
    """The `check_task` of a method that learns from label log-probs; `needs` says why, in the message."""
    if task.get("metric") != "label_accuracy" or not task.get("labels"):
        return [(["metric"], f"{needs}: the task needs metric 'label_accuracy' and labels")]
    return []


class Optimizer(ABC):
    method: ClassVar[str]
    params_model: ClassVar[type[MethodParams]]
    # Capabilities the scorer backend must have, and the optimizer backend must have.
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset()
    optimizer_needs: ClassVar[frozenset[Capability]] = frozenset()
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    # Purpose key of the seeded scoring subset (`train_subset`), one per method so methods draw different subsets.
    subset_purpose: ClassVar[int] = 0
    # True for a method that never reads the train targets: a label task's dataset may then hold unlabeled
    # examples (empty targets), provided dev and test do not come from them.
    accepts_unlabeled: ClassVar[bool] = False

    def __init__(self, params: MethodParams, seed: int) -> None:
        self.params = params
        self.seed = seed
        # Steps completed so far; step 0 scores the initial prompt.
        self.steps_done = 0
        # Positions inside the train split that form the scoring set (None: not chosen yet).
        self.scoring_positions: list[int] | None = None
        # `params.demonstrations` (text methods): the set every scored prompt carries, drawn from the task when the
        # first step runs (derived from the task and seeds, so never part of the state) ...
        self._carried: CarriedDemonstrations | None = None
        # ... except a searched set: the sets compared and the one chosen, kept in the state.
        self._demonstration_search: dict[str, Any] | None = None

    @classmethod
    def prompt_from_artifact(cls, artifact: dict[str, Any]) -> Prompt:
        """Rebuild a scorable prompt from a candidate's artifact (methods whose prompts are not text)."""
        raise ValueError(f"method {cls.method!r} has text prompts, not artifacts")

    @classmethod
    def text_candidate(cls, details: dict[str, Any]) -> bool:
        """Whether a stored candidate of this method is a text prompt that another job can use as it is (not a
        soft prompt, a head or a per-input prompt, which live in artifacts)."""
        return True

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> list[tuple[list[str], str]]:
        """Problems with a (resolved) task spec for this method, as (field path under `task`, message)."""
        return []

    @classmethod
    def check_split(cls, params: MethodParams, task: Task) -> list[tuple[list[str], str]]:
        """Problems with params on the job's split task (e.g. demonstration positions outside train), as (field path
        under `params`, message)."""
        return split_problems(carried_spec(params), len(task.split_examples("train")))

    @classmethod
    def prompt_extras(cls, params: MethodParams, task: Task, seed: int) -> tuple[str, str]:
        """Text beyond the instruction that the initial and the best prompt may carry on every example (the
        demonstrations), for the engine's test-scoring reserve: by default `params.demonstrations`'s block on both."""
        spec = carried_spec(params)
        if spec is None:
            return "", ""
        if spec.strategy == "search":  # not chosen yet: the longest set it could carry
            block = longest_block(task, set_size(spec, task), spec.layout)
        else:
            block = CarriedDemonstrations(spec, task, seed).block()
        return block, block

    @classmethod
    def check_params(cls, params: MethodParams) -> list[tuple[list[str], str]]:
        """Problems with validated params that their model cannot express (it must accept its defaults, which
        GET /v1/methods lists), as (field path under `params`, message)."""
        return []

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """Search steps after the initial one, for progress reporting."""

    @classmethod
    def expected_calls(cls, params: MethodParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        """About how many LLM calls a run with `params` makes on a task with these split sizes, its search and its
        dev selections (at most one per step), without the final test scoring; `num_layers` matters to methods
        with a step per model layer. An estimate for budgeting, not a cap: duplicates and the cache make it less.
        docs/methods/ derives each method's formula."""
        raise NotImplementedError

    @classmethod
    def initial_calls(cls, params: MethodParams, n_train: int, n_dev: int) -> int:
        """About how many LLM calls step 0 makes with its dev selection (for progress): by default the initial
        prompt on the scoring set and on dev, after the demonstration search if there is one."""
        size = cls.scoring_set_size(params, n_train)
        return size + n_dev + search_calls(params, size)

    @staticmethod
    def scoring_set_size(params: MethodParams, n_train: int) -> int:
        size = getattr(params, "train_subset", None)
        return n_train if size is None else min(size, n_train)

    @classmethod
    def train_objective(cls, candidate: CandidateResult) -> float:
        """The number a candidate leads its step by on the scoring set (higher wins); by default its score."""
        return candidate.score

    @classmethod
    def dev_objective(cls, score: PromptScore, task: Task, examples: list[Example]) -> float:
        """The number that decides, on the dev split, whether a candidate becomes the job's best (higher wins).
        By default the task's metric; a method that searches on another objective selects on that one."""
        return score.score

    @property
    def done(self) -> bool:
        return self.steps_done > self.total_steps

    async def step(self, ctx: OptimizerContext) -> StepReport:
        """Run one step (step index = self.steps_done) and advance."""
        if self.done:
            raise RuntimeError(f"{self.method}: the run is already complete")
        step = self.steps_done
        spec = carried_spec(self.params)
        searched = spec is not None and spec.strategy == "search" and self._demonstration_search is None
        if searched:
            self._demonstration_search = await self.search_demonstrations(ctx, spec)  # type: ignore[arg-type]
        carried = self.carried_demonstrations(ctx)
        if carried is not None:
            evaluator: Any = CarryingEvaluator(ctx.evaluator, carried)
            ctx = OptimizerContext(evaluator, ctx.optimizer_llm, ctx.initial_prompt)
        report = await (self.initial_step(ctx) if step == 0 else self.search_step(ctx, step))
        if carried is not None:
            carried.decorate(report.candidates)
        if searched and report.candidates:
            report.candidates[0].details["demonstration_search"] = self._demonstration_search["sets"]  # type: ignore[index]
        self.steps_done += 1
        return report

    async def search_demonstrations(self, ctx: OptimizerContext, spec: DemonstrationsParams) -> dict[str, Any]:
        """`params.demonstrations.strategy: search`: `sets` distinct stratified draws, each scored with the initial
        instruction on the scoring set in one batch; the best (the earlier draw on a tie) is carried from then on."""
        task = ctx.evaluator.task
        seed = self.seed if spec.seed is None else spec.seed
        draws: list[list[int]] = []
        for index in range(spec.sets):
            positions = draw(spec, task, derived_seed(seed, _SEED_DEMONSTRATION_SEARCH, index))
            if positions not in draws:
                draws.append(positions)
        prompts: list[Prompt] = [
            FixedDemonstrations(ctx.initial_prompt, demonstrations_of(task, positions), spec.layout)
            for positions in draws
        ]
        scores = await ctx.evaluator.score(prompts, "train", self.scoring_examples(ctx))
        best = max(range(len(draws)), key=lambda i: (scores[i].score, -i))
        sets = [{"demonstrations": d, "score": s.score} for d, s in zip(draws, scores, strict=True)]
        return {"chosen": draws[best], "sets": sets}

    def carried_demonstrations(self, ctx: OptimizerContext) -> CarriedDemonstrations | None:
        """The demonstration set of `params.demonstrations` (None without): the method sees instructions, every
        prompt it scores carries the set, and its candidates are the prompts scored (see
        `app.optimizers.demonstrations`)."""
        spec = carried_spec(self.params)
        if spec is None:
            return None
        if self._carried is None:
            chosen = None if self._demonstration_search is None else self._demonstration_search["chosen"]
            self._carried = CarriedDemonstrations(spec, ctx.evaluator.task, self.seed, chosen)
        return self._carried

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        """Step 0: the initial prompt scored on the scoring set (the engine takes it as the job's initial)."""
        examples = self.scoring_examples(ctx)
        results = await self.score_prompts(ctx, [ctx.initial_prompt], 0, examples)
        for result in results:
            result.details["origin"] = "initial"
        return StepReport(0, results, message=f"initial prompt scored on {len(examples)} examples")

    async def score_prompts(
        self, ctx: OptimizerContext, prompts: list[str], step: int, examples: list[Example]
    ) -> list[CandidateResult]:
        """Score prompts on `examples` in one batch; each comes back as a candidate of `step` (used by the default
        `initial_step`). Methods that remember what they scored override it."""
        scores = await ctx.evaluator.score(prompts, split="train", examples=examples)
        return [CandidateResult(s.prompt, s.score, step) for s in scores]

    @abstractmethod
    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        """One step of the search (step >= 1)."""

    def scoring_examples(self, ctx: OptimizerContext) -> list[Example]:
        """The scoring set: the train split, or a fixed seeded subset of `params.train_subset` examples."""
        train = ctx.evaluator.task.split_examples("train")
        if self.scoring_positions is None:
            size = getattr(self.params, "train_subset", None)
            self.scoring_positions = subset_positions(len(train), size, self.seed, self.subset_purpose)
        return [train[i] for i in self.scoring_positions]

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        state = {"steps_done": self.steps_done, "scoring_positions": self.scoring_positions, "method": self._state()}
        if self._demonstration_search is not None:
            state["demonstration_search"] = self._demonstration_search
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state["steps_done"]
        # Checkpoints written before the scoring set moved into the base class kept it in the method's state.
        positions = state.get("scoring_positions", state["method"].get("scoring_positions"))
        self.scoring_positions = None if positions is None else [int(p) for p in positions]
        self._demonstration_search = state.get("demonstration_search")
        self._carried = None
        self._load_state(state["method"])


async def settle(tasks: Iterable[asyncio.Task], error: BaseException) -> None:
    """After `error` stopped a step, deal with the step's other LLM tasks: cancelled if the job itself is being
    cancelled, otherwise awaited (their own errors ignored), so requests already sent are answered and charged
    rather than thrown away unpaid (e.g. the budget ran out in one of several concurrent scorings)."""
    tasks = list(tasks)
    if isinstance(error, asyncio.CancelledError):
        for task in tasks:
            task.cancel()
    if tasks:  # finished ones too: their errors are retrieved here, not reported as never retrieved
        await asyncio.gather(*tasks, return_exceptions=True)
