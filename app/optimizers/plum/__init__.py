"""Plum - Prompt Learning using Metaheuristic (Pan et al., arXiv 2311.08364).

Six metaheuristics (hill climbing, simulated annealing, GA with mutation only, GA with crossover, tabu
search, harmony search) over phrase-level edits of the instruction (delete, swap, paraphrase, re-add).
Method note: docs/methods/plum.md.

Adaptation to this service:

* Phrases come from a light chunker (punctuation and conjunction/preposition boundaries), not a constituency
  parser; paraphrases come from the optimizer LLM (seeded, batched requests), not PEGASUS.
* The search objective on label tasks is 100 x balanced accuracy + 10 x entropy (natural log) of the
  predicted-label counts on the scoring set; on other tasks 100 x the task metric. Reported candidate scores
  stay the task metric (0..1); the objective is in `details["objective"]`.
* Step 0 scores the initial prompt; every later step is one search iteration; the search stops early on
  patience (or the service's call budget). A text already scored is never scored again.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.evaluation.evaluator import PromptScore
from app.evaluation.task import Example, Task
from app.llm.port import Capability
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    ScoredPrompt,
    StepReport,
    instruction_hash,
    train_subset_field,
)
from app.optimizers.demonstrations import DemonstrationsParams, demonstrations_field, search_calls
from app.optimizers.plum.edits import ALL_OPS, Cand, EditOp, Editor, llm_paraphraser
from app.optimizers.plum.searches import Search, make_search

Algorithm = Literal["hill_climbing", "simulated_annealing", "genetic", "genetic_crossover", "tabu", "harmony"]


class PlumParams(MethodParams):
    algorithm: Algorithm = Field("genetic", description="Which metaheuristic runs the search.")
    num_iterations: int = Field(50, ge=0, le=10_000, description="Search iterations after scoring the initial prompt.")
    num_candidates: int = Field(10, ge=1, le=64, description="Edited children per iteration (m).")
    num_compose: int = Field(1, ge=1, le=8, description="Edits chained per child.")
    edits: list[EditOp] = Field(
        default_factory=lambda: list(ALL_OPS), min_length=1, description="Edit operations in use."
    )
    patience: int = Field(7, ge=0, le=10_000, description="Stop after more than this many non-improving iterations.")
    max_retries: int = Field(5, ge=0, le=50, description="Regenerations of an empty/non-alphabetic child.")
    # genetic
    tournament_size: int = Field(5, ge=1, le=64, description="GA (mutation only): tournament size.")
    # genetic_crossover
    population_size: int = Field(10, ge=1, le=256, description="GA-C: population size N_p.")
    num_offspring: int = Field(
        5, ge=0, le=256, description="GA-C: crossover children per iteration (the official 0 disables crossover)."
    )
    crossover_tournament_size: int = Field(2, ge=1, le=64, description="GA-C: tournament size for parents.")
    mutation_prob: float = Field(0.5, ge=0.0, le=1.0, description="GA-C: chance a member is mutated.")
    # simulated_annealing
    sa_t_max: float = Field(10.0, gt=0.0, description="SA: initial temperature T_max.")
    sa_k: float = Field(5.0, gt=0.0, description="SA: cooling constant K in T = T_max * exp(-i / K).")
    # tabu
    tabu_size: int = Field(5, ge=1, le=1000, description="Tabu: length of the tabu list.")
    tabu_admit_prob: float = Field(0.5, ge=0.0, le=1.0, description="Tabu: chance a tabu child is admitted.")
    # harmony
    hs_memory: int = Field(10, ge=1, le=256, description="Harmony: memory size N_H.")
    hs_segments: int = Field(5, ge=1, le=64, description="Harmony: segments per harmony (ks).")
    hs_hmcr: float = Field(0.4, ge=0.0, le=1.0, description="Harmony: memory consideration rate.")
    hs_par: float = Field(0.5, ge=0.0, le=1.0, description="Harmony: pitch adjustment (paraphrase) rate.")
    # paraphrase requests
    paraphrase_temperature: float = Field(1.0, ge=0.0, le=2.0, description="Paraphrase sampling temperature.")
    paraphrase_max_tokens: int = Field(60, ge=4, le=1024, description="Max new tokens per paraphrase.")
    train_subset: int | None = train_subset_field("scoring_subset")
    demonstrations: DemonstrationsParams | None = demonstrations_field()


_PAPER: dict[str, Any] = {
    "algorithm": "genetic",
    "num_iterations": 50,
    "num_candidates": 10,
    "num_compose": 1,
    "patience": 7,
    "tournament_size": 5,
    "population_size": 10,
    "num_offspring": 5,
    "crossover_tournament_size": 2,
    "mutation_prob": 0.5,
    "paraphrase_max_tokens": 60,
    "train_subset": 100,
}

_SMALL: dict[str, Any] = {
    "algorithm": "genetic",
    "num_iterations": 4,
    "num_candidates": 3,
    "num_compose": 1,
    "patience": 2,
    "tournament_size": 2,
    "population_size": 4,
    "num_offspring": 2,
    "hs_memory": 4,
    "paraphrase_max_tokens": 24,
}


def entropy(counts: list[int]) -> float:
    total = sum(counts)
    if total <= 0:
        return 0.0
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)


def balanced_accuracy(per_example: list[float], targets: list[str]) -> float:
    """Mean over gold classes of the mean per-example correctness."""
    by_class: dict[str, list[float]] = {}
    for value, target in zip(per_example, targets, strict=True):
        by_class.setdefault(target.strip().lower(), []).append(value)
    if not by_class:
        return 0.0
    return sum(sum(v) / len(v) for v in by_class.values()) / len(by_class)


def objective(scored: PromptScore, task: Task, examples: list[Example]) -> float:
    """100 x balanced accuracy + 10 x entropy of predicted-label counts (label tasks); else 100 x metric."""
    if task.metric == "label_accuracy" and task.labels:
        bacc = balanced_accuracy(scored.per_example, [ex.target for ex in examples])
        predicted = Counter(p.strip().lower() for p in scored.predictions)
        counts = [predicted.get(label.strip().lower(), 0) for label in task.labels]
        return 100.0 * bacc + 10.0 * entropy(counts)
    return 100.0 * scored.score


class Plum(Optimizer):
    method: ClassVar[str] = "plum"
    params_model: ClassVar[type[MethodParams]] = PlumParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset()
    optimizer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.GENERATE})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER, "small": _SMALL}
    subset_purpose: ClassVar[int] = 301

    params: PlumParams

    def __init__(self, params: PlumParams, seed: int) -> None:
        super().__init__(params, seed)
        self.search_state: dict[str, Any] | None = None
        # instruction hash -> its objective, task score and the step it was first scored
        self.scored: dict[str, ScoredPrompt] = {}

    @property
    def total_steps(self) -> int:
        return self.params.num_iterations

    @classmethod
    def expected_calls(cls, params: PlumParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        p = params
        s, m, iterations = cls.scoring_set_size(p, n_train), p.num_candidates, p.num_iterations
        children = m + (p.num_offspring if p.algorithm == "genetic_crossover" else 0)
        return s + iterations * (children * s + m * p.num_compose) + (iterations + 1) * n_dev + search_calls(p, s)

    @property
    def done(self) -> bool:
        return super().done or bool(self.search_state and self.search_state["stopped"])

    # -- state ------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "search": self.search_state,
            "scored": {k: v.to_json() for k, v in self.scored.items()},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.search_state = state["search"]
        self.scored = {k: ScoredPrompt.from_json(v) for k, v in state["scored"].items()}

    # -- helpers ----------------------------------------------------------------------------------------

    def make_search(self, ctx: OptimizerContext) -> Search:
        p = self.params
        paraphraser = llm_paraphraser(ctx.optimizer_llm, p.paraphrase_max_tokens, p.paraphrase_temperature)
        editor = Editor(self.seed, paraphraser, p.edits, p.num_compose, p.max_retries)
        search = make_search(p.algorithm, p, self.seed, editor)
        if self.search_state is not None:
            search.load_state_dict(self.search_state)
        return search

    async def evaluate(
        self, ctx: OptimizerContext, texts: list[str], step: int, examples: list[Example]
    ) -> tuple[list[float], list[CandidateResult]]:
        """Objective values of `texts`; unseen texts are scored in one evaluator call and reported."""
        fresh = list(dict.fromkeys(t for t in texts if instruction_hash(t) not in self.scored))
        results = []
        if fresh:
            scores = await ctx.evaluator.score(fresh, split="train", examples=examples)
            for text, scored in zip(fresh, scores, strict=True):
                value = objective(scored, ctx.evaluator.task, examples)
                self.scored[instruction_hash(text)] = ScoredPrompt(value, float(scored.score), step)
                results.append(
                    CandidateResult(
                        text,
                        float(scored.score),
                        step,
                        {"objective": round(value, 6), "algorithm": self.params.algorithm},
                    )
                )
        return [self.scored[instruction_hash(t)].objective for t in texts], results

    def best(self) -> CandidateResult | None:
        if not self.search_state or not self.search_state["best"]:
            return None
        best = self.search_state["best"]
        text = Cand.from_json(best["cand"]).text
        scored = self.scored[instruction_hash(text)]
        return CandidateResult(text, scored.score, scored.step, {"objective": best["value"]})

    # -- the step ---------------------------------------------------------------------------------------

    # Plum searches on its objective, so the engine also selects on it (on train to pick a step's leader, then
    # on dev); the reported scores stay the task's metric.
    @classmethod
    def train_objective(cls, candidate: CandidateResult) -> float:
        return float(candidate.details["objective"])

    @classmethod
    def dev_objective(cls, score: PromptScore, task: Task, examples: list[Example]) -> float:
        return objective(score, task, examples)

    async def score_prompts(
        self, ctx: OptimizerContext, prompts: list[str], step: int, examples: list[Example]
    ) -> list[CandidateResult]:
        # Plum's candidates are phrase lists; a prompt is scored as the text its phrases join back into.
        return (await self.evaluate(ctx, [Cand.from_text(p).text for p in prompts], step, examples))[1]

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        report = await super().initial_step(ctx)
        search = self.make_search(ctx)
        initial = Cand.from_text(ctx.initial_prompt)
        search.start(initial, self.scored[instruction_hash(initial.text)].objective)
        self.search_state = search.state_dict()
        return report

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        examples = self.scoring_examples(ctx)
        search = self.make_search(ctx)
        reported: list[CandidateResult] = []
        proposed = 0
        while True:
            cands = await search.ask()
            ops_of = {c.text: ops for c, ops in zip(cands, search.asked_ops, strict=True)}
            proposed += len(cands)
            values, results = await self.evaluate(ctx, [c.text for c in cands], step, examples)
            for r in results:
                r.details["ops"] = ops_of.get(r.prompt, [])
            reported += results
            if search.tell(values):
                break
        self.search_state = search.state_dict()
        best = search.best["value"] if search.best else float("nan")
        message = (
            f"{self.params.algorithm} iteration {search.iteration}: {proposed} proposals, {len(reported)} new; "
            f"best objective {best:.2f}, stall {search.stall}" + ("; stopped" if search.stopped else "")
        )
        return StepReport(step, reported, message=message)
