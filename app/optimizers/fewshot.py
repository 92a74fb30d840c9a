"""`fewshot`: search demonstration sets and instructions together, by successive halving. Method note:
docs/methods/fewshot.md.

A candidate is an instruction and a way of choosing demonstrations (`app.evaluation.demonstrations`):

* none - the instruction alone (zero-shot; `zero_shot`);
* random - a seeded stratified draw of `k_per_class` train examples per label (`random_sets` draws), each in its
  drawn order and in `orders` - 1 further seeded orders;
* nearest - per input, its k most similar train examples by sentence embedding (KNN few-shot; `knn`), from a pool of
  at most `knn_pool` train examples.

The instructions are the initial prompt, the given `instructions`, and optionally `proposals` ones an optimizer LLM
writes from OPRO's meta-prompt (the initial prompt with its score and a few train problems). Every (demonstrations x
instruction) pair is a candidate.

Step 0 scores the initial prompt on the scoring set. Steps 1..R are the rounds of successive halving: round r scores
the candidates still alive on the first n_r examples of a fixed, label-interleaved order of the scoring set (n_0 =
`first_examples`, doubling every round; the last round uses the whole scoring set, and the subsets are nested, so an
example a survivor was scored on is a cache hit) and keeps the best `keep_fraction` of them (ties: the earlier
candidate, zero-shot first), down to the last round, which keeps one. R comes from the largest possible candidate
count, so it is known before the search starts.

An example is never scored with itself among its demonstrations (the prompt objects leave it out), demonstrations
come from the train split only, and dev and test are only scored by the engine.

Selection: each round's leader is offered to the engine's dev selection, with train objective step + train score, so
a later round's leader (scored on more examples) is always scored on dev, and the job's best is the leader with the
best dev score. A fixed demonstration set is plain text (`prompt`; `details` hold `instruction` and the train
positions in `demonstrations`); a nearest-neighbour candidate is a per-input prompt, rebuilt for dev, test and
`predict` from its artifact.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar

from pydantic import Field, model_validator

from app.evaluation.demonstrations import (
    FixedDemonstrations,
    NearestDemonstrations,
    demonstrations_of,
    longest_block,
    pick_demonstrations,
    reorder,
)
from app.evaluation.evaluator import Prompt
from app.evaluation.task import Example, Task
from app.llm.port import GenerationRequest
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    StepReport,
    derived_rng,
    derived_seed,
    instruction_hash,
    subset_positions,
    train_subset_field,
)
from app.optimizers.demonstrations import LAYOUT_DESCRIPTION, Layout
from app.optimizers.opro import INS, build_meta_prompt, extract_instruction

# Purpose tags of the derived seeds.
_SEED_DRAW = 31
_SEED_ORDER = 32
_SEED_POOL = 33
_SEED_EXAMPLES = 34
_SEED_PROPOSAL = 35
_SEED_EXEMPLARS = 36

_RAW_DETAIL_CHARS = 300


class FewshotParams(MethodParams):
    k_per_class: int = Field(
        1, ge=1, le=64, description="Demonstrations per label in a random set (a generation task: in all)."
    )
    random_sets: int = Field(8, ge=0, le=256, description="Seeded stratified draws of demonstrations.")
    orders: int = Field(1, ge=1, le=16, description="Orders of each drawn set (its own and seeded permutations).")
    knn: list[Annotated[int, Field(ge=1, le=64)]] | None = Field(
        None,
        max_length=8,
        description="Nearest-neighbour candidates, one per size (demonstrations per input, by sentence-embedding "
        "similarity); null: one, as many as a random set has; []: none.",
    )
    knn_pool: int = Field(
        1000, ge=1, le=5000, description="Nearest neighbours come from a seeded subset of this many train examples."
    )
    zero_shot: bool = Field(True, description="Also keep each instruction without demonstrations in the search.")
    instructions: list[Annotated[str, Field(max_length=20_000)]] = Field(
        default_factory=list, max_length=32, description="Instructions to try besides the initial prompt."
    )
    proposals: int = Field(
        0, ge=0, le=32, description="Instructions to have the optimizer LLM propose (OPRO's meta-prompt, once)."
    )
    proposal_exemplars: int = Field(3, ge=0, le=20, description="Train problems shown in the proposal meta-prompt.")
    optimizer_temperature: float = Field(1.0, ge=0.0, le=2.0, description="Proposal sampling temperature.")
    optimizer_max_tokens: int = Field(128, ge=8, le=8192, description="Max new tokens per proposal.")
    max_instruction_chars: int = Field(500, ge=1, le=20_000, description="Longer proposals are dropped.")
    first_examples: int = Field(
        8, ge=1, le=100_000, description="Examples each candidate is scored on in the first round (doubled per round)."
    )
    keep_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="Share of the candidates each round keeps.")
    layout: Layout = Field("demonstrations_first", description=LAYOUT_DESCRIPTION)
    train_subset: int | None = train_subset_field()

    @model_validator(mode="after")
    def _something_to_search(self) -> FewshotParams:
        if self.random_sets == 0 and self.knn == [] and not self.zero_shot:
            raise ValueError("nothing to search: set random_sets, knn or zero_shot")
        return self


_SMALL: dict[str, Any] = {"random_sets": 4, "first_examples": 8, "train_subset": 48}
_LARGE: dict[str, Any] = {"random_sets": 16, "orders": 2, "first_examples": 16}
_PROPOSE: dict[str, Any] = {"random_sets": 4, "proposals": 4}


# ----------------------------------------------------------------------------------------------------------
# Successive halving, as pure functions


def survivor_plan(n_candidates: int, keep_fraction: float) -> list[int]:
    """How many candidates each round scores: all of them, then the kept share of the round before (at least one
    fewer, never fewer than two) until two are left; the last round keeps one."""
    plan = [max(1, n_candidates)]
    while plan[-1] > 2:
        plan.append(max(2, min(plan[-1] - 1, math.ceil(plan[-1] * keep_fraction))))
    return plan


def round_sizes(rounds: int, first: int, scoring: int) -> list[int]:
    """Examples per round: `first`, doubling, capped by the scoring set; the last round uses the whole set."""
    sizes = [min(scoring, first * 2**r) for r in range(rounds)]
    if sizes:
        sizes[-1] = scoring
    return sizes


def keep_best(alive: list[int], scores: list[float], keep: int) -> list[int]:
    """The `keep` best of `alive` (candidate indices, scores in the same order), best first; ties: the lower
    index."""
    ranked = sorted(range(len(alive)), key=lambda j: (-scores[j], alive[j]))
    return [alive[j] for j in ranked[:keep]]


def interleaved_order(targets: list[str], labels: list[str] | None, seed: int, *keys: int) -> list[int]:
    """A seeded order of positions that takes labels in turn (each label's examples shuffled, the labels in a
    seeded order), so every prefix is as balanced as it can be; without labels a plain permutation."""
    rng = derived_rng(seed, *keys)
    if not labels:
        return [int(i) for i in rng.permutation(len(targets))]
    pools = [[i for i, t in enumerate(targets) if t == label] for label in labels]
    pools += [[i for i, t in enumerate(targets) if t not in labels]]
    for pool in pools:
        rng.shuffle(pool)
    turn = [pools[i] for i in rng.permutation(len(pools))]
    order: list[int] = []
    while any(turn):
        for pool in turn:
            if pool:
                order.append(pool.pop())
    return order


# ----------------------------------------------------------------------------------------------------------
# The optimizer


class Fewshot(Optimizer):
    """Demonstration sets (stratified random draws, nearest neighbours) and instructions searched together by
    successive halving."""

    method: ClassVar[str] = "fewshot"
    params_model: ClassVar[type[MethodParams]] = FewshotParams
    presets: ClassVar[dict[str, dict[str, Any]]] = {"small": _SMALL, "large": _LARGE, "propose": _PROPOSE}
    subset_purpose: ClassVar[int] = 30

    params: FewshotParams

    def __init__(self, params: FewshotParams, seed: int) -> None:
        super().__init__(params, seed)
        self.instructions: list[str] = []
        # Demonstration configurations: {"kind": "none"} | {"kind": "random", "positions", "draw", "order"} |
        # {"kind": "nearest", "k"}; candidates are (configuration, instruction) index pairs.
        self.configs: list[dict[str, Any]] = []
        self.candidates: list[tuple[int, int]] = []
        self.alive: list[int] = []
        self.example_order: list[int] = []  # positions in the scoring set, in the order rounds take them
        self.knn_positions: list[int] = []  # the nearest-neighbour pool (train positions)
        self.initial_score: float | None = None
        self.proposal_log: dict[str, Any] = {}
        # Prompt objects, rebuilt from the state on demand (nearest-neighbour rankings are kept between rounds).
        self._prompts: dict[int, Prompt] = {}

    # -- sizes ------------------------------------------------------------------------------------------------

    @classmethod
    def max_candidates(cls, params: FewshotParams) -> int:
        knn = 1 if params.knn is None else len(params.knn)
        configs = int(params.zero_shot) + params.random_sets * params.orders + knn
        return configs * (1 + len(params.instructions) + params.proposals)

    @classmethod
    def plan(cls, params: FewshotParams) -> list[int]:
        return survivor_plan(cls.max_candidates(params), params.keep_fraction)

    @property
    def total_steps(self) -> int:
        return len(self.plan(self.params))

    @classmethod
    def expected_calls(cls, params: FewshotParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        s = cls.scoring_set_size(params, n_train)
        plan = cls.plan(params)
        sizes = round_sizes(len(plan), params.first_examples, s)
        search = sum(alive * (n - before) for alive, n, before in zip(plan, sizes, [0, *sizes], strict=False))
        return s + params.proposals + search + (len(plan) + 1) * n_dev

    @classmethod
    def demonstrations_per_prompt(cls, params: FewshotParams, task: Task) -> int:
        per_set = params.k_per_class * (len(task.labels) if task.labels else 1)
        return max([per_set if params.random_sets else 0, *(cls._knn_sizes(params, task))], default=0)

    @classmethod
    def _knn_sizes(cls, params: FewshotParams, task: Task) -> list[int]:
        if params.knn is not None:
            return list(params.knn)
        return [params.k_per_class * (len(task.labels) if task.labels else 1)]

    @classmethod
    def prompt_extras(cls, params: MethodParams, task: Task, seed: int) -> tuple[str, str]:
        """The initial prompt carries no demonstrations; the best may carry the longest set a candidate can have."""
        assert isinstance(params, FewshotParams)
        return "", longest_block(task, cls.demonstrations_per_prompt(params, task), params.layout)

    @classmethod
    def train_objective(cls, candidate: CandidateResult) -> float:
        # A later round's leader was scored on more examples: it is always offered to the dev selection.
        return candidate.step + candidate.score

    @classmethod
    def text_candidate(cls, details: dict[str, Any]) -> bool:
        return "nearest" not in details  # nearest-neighbour demonstrations are chosen per input

    @classmethod
    def prompt_from_artifact(cls, artifact: dict[str, Any]) -> Prompt:
        return NearestDemonstrations.from_artifact(artifact)

    # -- state ------------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "instructions": list(self.instructions),
            "configs": [dict(c) for c in self.configs],
            "candidates": [list(c) for c in self.candidates],
            "alive": list(self.alive),
            "example_order": list(self.example_order),
            "knn_positions": list(self.knn_positions),
            "initial_score": self.initial_score,
            "proposal_log": dict(self.proposal_log),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.instructions = list(state["instructions"])
        self.configs = [dict(c) for c in state["configs"]]
        self.candidates = [(int(c), int(i)) for c, i in state["candidates"]]
        self.alive = [int(i) for i in state["alive"]]
        self.example_order = [int(i) for i in state["example_order"]]
        self.knn_positions = [int(i) for i in state["knn_positions"]]
        self.initial_score = state["initial_score"]
        self.proposal_log = dict(state["proposal_log"])
        self._prompts = {}

    # -- building the candidates ------------------------------------------------------------------------------

    def demonstration_configs(self, task: Task) -> list[dict[str, Any]]:
        """The demonstration configurations, in candidate order (zero-shot, random sets, nearest neighbours); two
        draws that come out identical are one configuration."""
        p = self.params
        train = task.split_examples("train")
        targets = [ex.target for ex in train]
        labels = task.labels or None
        count = p.k_per_class * (len(labels) if labels else 1)
        configs: list[dict[str, Any]] = [{"kind": "none"}] if p.zero_shot else []
        seen: set[tuple[int, ...]] = set()
        for draw in range(p.random_sets):
            drawn = pick_demonstrations(targets, labels, count, derived_seed(self.seed, _SEED_DRAW, draw))
            for order in range(p.orders):
                positions = drawn
                for attempt in range(8 if order else 1):  # another order of the set, not one already there
                    if order:
                        positions = reorder(drawn, self.seed, _SEED_ORDER, draw, order, attempt)
                    if tuple(positions) not in seen:
                        break
                if not positions or tuple(positions) in seen:
                    continue
                seen.add(tuple(positions))
                configs.append({"kind": "random", "positions": positions, "draw": draw, "order": order})
        for k in self._knn_sizes(p, task):
            if len(train) > 1:
                configs.append({"kind": "nearest", "k": min(k, len(train) - 1)})
        return configs

    async def propose(self, ctx: OptimizerContext, examples: list[Example]) -> list[str]:
        """Instructions the optimizer LLM writes from OPRO's meta-prompt: the initial prompt with its score and a few
        train problems (one seeded request each), parsed and de-duplicated."""
        p = self.params
        if p.proposals == 0:
            return []
        picks = derived_rng(self.seed, _SEED_EXEMPLARS).permutation(len(examples))[: p.proposal_exemplars]
        shown = [{"instruction": ctx.initial_prompt, "score": self.initial_score or 0.0}]
        exemplars = [(ctx.evaluator.render(INS, examples[i]), examples[i].target) for i in picks]
        meta = build_meta_prompt(shown, exemplars)
        requests = [
            GenerationRequest(
                meta,
                max_tokens=p.optimizer_max_tokens,
                temperature=p.optimizer_temperature,
                seed=derived_seed(self.seed, _SEED_PROPOSAL, i),
            )
            for i in range(p.proposals)
        ]
        generations = await ctx.optimizer_llm.generate(requests)
        out: list[str] = []
        dropped: dict[str, int] = {}
        for generation in generations:
            text = extract_instruction(generation.texts[0] if generation.texts else "")
            reason = (
                "empty"
                if not text
                else "too_long"
                if len(text) > p.max_instruction_chars
                else "contains_INS"
                if "INS" in text
                else None
            )
            if reason is None:
                out.append(text)
            else:
                dropped[reason] = dropped.get(reason, 0) + 1
        self.proposal_log = {"proposed": len(generations), "kept": len(out), "dropped": dropped}
        return out

    async def build(self, ctx: OptimizerContext) -> None:
        task = ctx.evaluator.task
        train = task.split_examples("train")
        scoring = self.scoring_examples(ctx)
        instructions: list[str] = []
        seen: set[str] = set()
        for text in [ctx.initial_prompt, *self.params.instructions, *await self.propose(ctx, scoring)]:
            if instruction_hash(text) not in seen:
                seen.add(instruction_hash(text))
                instructions.append(text)
        self.instructions = instructions
        self.configs = self.demonstration_configs(task)
        self.candidates = [(c, i) for c in range(len(self.configs)) for i in range(len(instructions))]
        self.alive = list(range(len(self.candidates)))
        self.knn_positions = subset_positions(len(train), self.params.knn_pool, self.seed, _SEED_POOL)
        positions = self.scoring_positions or []
        targets = [train[i].target for i in positions]
        self.example_order = interleaved_order(targets, task.labels, self.seed, _SEED_EXAMPLES)

    # -- prompts ----------------------------------------------------------------------------------------------

    def prompt(self, task: Task, candidate: int) -> Prompt:
        """The candidate as the evaluator scores it on train."""
        if candidate not in self._prompts:
            c, i = self.candidates[candidate]
            config, instruction = self.configs[c], self.instructions[i]
            if config["kind"] == "none":
                prompt: Prompt = instruction
            elif config["kind"] == "random":
                prompt = FixedDemonstrations(
                    instruction, demonstrations_of(task, config["positions"]), self.params.layout
                )
            else:
                prompt = NearestDemonstrations.from_task(
                    task, self.knn_positions, instruction, config["k"], self.params.layout
                )
            self._prompts[candidate] = prompt
        return self._prompts[candidate]

    def candidate_result(self, task: Task, candidate: int, score: float, step: int, extra: dict) -> CandidateResult:
        c, i = self.candidates[candidate]
        config, instruction = self.configs[c], self.instructions[i]
        prompt = self.prompt(task, candidate)
        details: dict[str, Any] = {"instruction": instruction, "strategy": config["kind"], **extra}
        if config["kind"] == "random":
            assert isinstance(prompt, FixedDemonstrations)
            details.update(demonstrations=prompt.positions, draw=config["draw"], order=config["order"])
            return CandidateResult(prompt.text, score, step, details)
        if config["kind"] == "nearest":
            assert isinstance(prompt, NearestDemonstrations)
            details.update(nearest=prompt.k, pool=len(prompt.pool))
            return CandidateResult(
                prompt.description,
                score,
                step,
                details,
                artifact=prompt.to_artifact(self.method),
                scoring_prompt=prompt,
            )
        details["demonstrations"] = []
        return CandidateResult(instruction, score, step, details)

    # -- steps ------------------------------------------------------------------------------------------------

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        examples = self.scoring_examples(ctx)
        (score,) = await ctx.evaluator.score([ctx.initial_prompt], "train", examples)
        self.initial_score = score.score
        details = {"origin": "initial", "instruction": ctx.initial_prompt, "demonstrations": []}
        result = CandidateResult(ctx.initial_prompt, score.score, 0, details)
        return StepReport(0, [result], message=f"initial prompt scored on {len(examples)} examples")

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        task = ctx.evaluator.task
        scoring = self.scoring_examples(ctx)
        if step == 1:
            await self.build(ctx)
        plan = self.plan(self.params)
        rounds = len(plan)
        r = step - 1
        size = round_sizes(rounds, self.params.first_examples, len(scoring))[r]
        examples = [scoring[i] for i in self.example_order[:size]]
        alive = list(self.alive)
        scores = await ctx.evaluator.score([self.prompt(task, c) for c in alive], "train", examples)
        values = [s.score for s in scores]
        keep = 1 if r == rounds - 1 else min(len(alive), plan[r + 1])
        kept = keep_best(alive, values, keep)
        self.alive = kept
        survivors = set(kept)
        results = [
            self.candidate_result(
                task, c, value, step, {"round": r, "examples": size, "kept": c in survivors, "candidate": c}
            )
            for c, value in zip(alive, values, strict=True)
        ]
        leader = alive.index(kept[0])
        message = (
            f"round {r + 1}/{rounds}: {len(alive)} candidates on {size} examples, kept {len(kept)}; "
            f"leader {results[leader].details['strategy']} at {values[leader]:.3f}"
        )
        if step == 1 and self.proposal_log:
            log = self.proposal_log
            message += f"; {log['kept']} of {log['proposed']} proposed instructions parsed"
        return StepReport(step, results, message=message, leader=leader)
