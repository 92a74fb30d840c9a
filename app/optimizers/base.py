"""The optimizer contract.

An optimizer is an ask/tell object: `step()` asks for candidates (possibly through the optimizer
LLM), has them scored by the evaluator, and tells itself the scores. Between steps its whole state,
RNG included, is `state_dict()` - plain JSON - so a worker can resume it anywhere.

Optimizers import nothing from FastAPI, SQLAlchemy, Redis or SAQ.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.evaluation.evaluator import Evaluator, Prompt, SoftPrompt
from app.llm.metered import MeteredLLM
from app.llm.port import Capability


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


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
    scoring_prompt: SoftPrompt | None = None


@dataclass(slots=True)
class StepReport:
    step: int
    candidates: list[CandidateResult]
    message: str | None = None
    # Index of the candidate the engine should consider for model selection (default: highest score).
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


def new_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def rng_from_state(state: dict) -> np.random.Generator:
    bit_generator = np.random.PCG64()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


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

    def __init__(self, params: MethodParams, seed: int) -> None:
        self.params = params
        self.seed = seed
        self.rng = new_rng(seed)
        # Steps completed so far; step 0 scores the initial prompt.
        self.steps_done = 0

    @classmethod
    def prompt_from_artifact(cls, artifact: dict[str, Any]) -> Prompt:
        """Rebuild a scorable prompt from a candidate's artifact (methods whose prompts are not text)."""
        raise ValueError(f"method {cls.method!r} has text prompts, not artifacts")

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> list[tuple[list[str], str]]:
        """Problems with a (resolved) task spec for this method, as (field path under `task`, message)."""
        return []

    @property
    @abstractmethod
    def total_steps(self) -> int:
        """Search steps after the initial one, for progress reporting."""

    @property
    def done(self) -> bool:
        return self.steps_done > self.total_steps

    @abstractmethod
    async def step(self, ctx: OptimizerContext) -> StepReport:
        """Run one step (step index = self.steps_done) and advance."""

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "rng": rng_state(self.rng), "method": self._state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = state["steps_done"]
        self.rng = rng_from_state(state["rng"])
        self._load_state(state["method"])
