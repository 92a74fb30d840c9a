"""ClaPS - Clustering and Pruning for Efficient Black-box Prompt Search (Zhou et al., Findings of EMNLP 2023,
arXiv 2310.12774). Method note: docs/methods/claps.md.

The prompt is a short string of vocabulary words placed in the template's `{prompt}` slot (in place of the manual
prompt, which stays the baseline). Three phases, one checkpoint per step:

1. Clustering (step 1, no LLM calls): the word-start tokens of the scorer's vocabulary, embedded with the model's
   own input embeddings where the backend offers them (`token_embeddings`, the local runner), else the whole words
   of all-MiniLM-L6-v2's vocabulary embedded with that sentence-embedding model; k-means with `n_clusters`, one
   representative word (nearest to each centroid) per cluster. The result is cached per (model, settings) in the
   evaluation cache, so later jobs re-use it.
2. Pruning (ceil(n_clusters / prune_chunk) steps): the influence of each representative is the reward with that
   word as the prompt minus the reward with the empty prompt (`prune_type="kl"`: the summed KL divergence of its
   class distribution from the empty prompt's); the words strictly above the `percentile`-th percentile stay.
3. Search: `greedy` (one step per position: try every pruned word after the current string, keep the best) or
   `genetic` (one step per epoch: score the population, keep the top `mutate_frac` as parents, add mutants and
   uniform per-token crossover children).

Adaptation to this service:

* Labels are scored through the evaluation engine's label log-probs (first token of each verbalizer), so it runs
  on the local runner and on vLLM alike; every step sends all its (prompt x example) requests as one batch.
* reward = -(mean cross-entropy between the verbalizer-restricted class distribution and the gold label) on the
  scoring set (the train split or a seeded subset). It drives pruning and search (ties: accuracy); a candidate's
  reported score is its train accuracy (computed from the same log-probs with the evaluator's argmax rule) and
  the reward is in `details["reward"]`. A string already scored is never scored again.
* Final pick: only the search phase's strings (greedy or genetic) are eligible to become the job's best; the
  engine scores each search step's leader (highest train accuracy, ties by reward) on the dev split and keeps
  it when it beats the best so far (the manual prompt to begin with), as the paper picks among its searched
  prompts on validation. Pruning words and the empty prompt are reported as candidates but never returned.
* Step 0 scores the manual prompt (the baseline) and the empty prompt (the reference of the influence score);
  the empty prompt is reported as a candidate of step 1. All randomness comes from generators seeded with
  (job seed, purpose, step), so a resumed run equals an uninterrupted one. Method notes: docs/methods/claps.md.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.evaluation.task import Example
from app.llm.port import Capability
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    ScoredPrompt,
    StepReport,
    derived_rng,
    label_task_problems,
    train_subset_field,
)
from app.optimizers.claps.search import kl_divergence, next_generation, prune, reward_and_accuracy
from app.optimizers.claps.vocab import cluster_representatives, prompt_text, word_start_tokens

Search = Literal["greedy", "genetic"]
PruneType = Literal["reward", "kl"]

# Purpose tags of the derived generators.
_SEED_POPULATION = 502
_SEED_GENERATION = 503

VOCABULARY_CACHE_KIND = "claps_vocabulary"
_VOCABULARY_VERSION = 1


class ClapsParams(MethodParams):
    search: Search = Field("greedy", description="Search in the pruned vocabulary: 'greedy' or 'genetic'.")
    n_clusters: int = Field(2000, ge=1, le=20_000, description="k of the k-means over the vocabulary's words.")
    percentile: float = Field(
        90.0, ge=0.0, lt=100.0, description="Keep the representatives whose influence is above this percentile."
    )
    prune_type: PruneType = Field(
        "reward",
        description="Influence of a word: 'reward' (its reward minus the empty prompt's) or 'kl' (summed KL "
        "divergence of its class distribution from the empty prompt's).",
    )
    min_pruned: int = Field(1, ge=1, le=20_000, description="Keep at least this many words after pruning.")
    prune_chunk: int = Field(
        64, ge=1, le=20_000, description="Representatives scored per pruning step (one checkpoint each)."
    )
    prompt_length: int = Field(5, ge=1, le=64, description="Words in the searched prompt.")
    population_size: int = Field(128, ge=2, le=4096, description="Genetic: size of the first population.")
    n_epochs: int = Field(30, ge=1, le=1000, description="Genetic: epochs (one step each).")
    mutate_frac: float = Field(
        0.1, gt=0.0, le=1.0, description="Genetic: share of the population kept as parents (at least 2)."
    )
    mutation_prob: float = Field(0.1, ge=0.0, le=1.0, description="Genetic: chance each token of a mutant changes.")
    n_mutants: int = Field(64, ge=0, le=4096, description="Genetic: mutants per epoch.")
    n_crossovers: int = Field(64, ge=0, le=4096, description="Genetic: uniform-crossover children per epoch.")
    train_subset: int | None = train_subset_field("scoring_subset")
    kmeans_seed: int = Field(0, ge=0, le=2**31 - 1, description="random_state of the k-means (the paper uses 0).")


_PAPER: dict[str, Any] = {
    "search": "greedy",
    "n_clusters": 2000,
    "percentile": 90.0,
    "prune_type": "reward",
    "prompt_length": 5,
    "population_size": 128,
    "n_epochs": 30,
    "mutate_frac": 0.1,
    "mutation_prob": 0.1,
    "n_mutants": 64,
    "n_crossovers": 64,
}

# SmolLM2-135M on two CPU cores, 16-shot DBpedia: about 10 minutes per job for either search.
_SMALL: dict[str, Any] = {
    "search": "greedy",
    "n_clusters": 96,
    "percentile": 87.5,
    "prune_type": "reward",
    "prune_chunk": 32,
    "prompt_length": 3,
    "population_size": 16,
    "n_epochs": 4,
    "mutate_frac": 0.25,
    "mutation_prob": 0.3,
    "n_mutants": 8,
    "n_crossovers": 8,
    "train_subset": 24,
}


class Claps(Optimizer):
    """ClaPS: a few vocabulary words as the prompt, searched in a clustered and pruned vocabulary."""

    method: ClassVar[str] = "claps"
    params_model: ClassVar[type[MethodParams]] = ClapsParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.LABEL_LOGPROBS})
    optimizer_needs: ClassVar[frozenset[Capability]] = frozenset()
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER, "small": _SMALL}
    subset_purpose: ClassVar[int] = 501

    params: ClapsParams

    def __init__(self, params: ClapsParams, seed: int) -> None:
        super().__init__(params, seed)
        self.empty: dict[str, Any] | None = None  # reward, accuracy, logprobs of the empty prompt
        self.vocabulary: dict[str, Any] | None = None  # source, size of the clustered vocabulary
        self.representatives: list[str] | None = None  # pieces (" word"), one per cluster
        self.influence: list[float | None] = []
        self.pruned: list[str] | None = None
        self.tokens: list[int] = []  # greedy: the string so far (indices into `pruned`)
        self.population: list[list[int]] | None = None  # genetic: the population to score next
        self.history: list[dict[str, Any]] = []  # best string after each search step
        self.scored: dict[str, ScoredPrompt] = {}  # prompt text -> reward (objective), accuracy, step first scored

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> list[tuple[list[str], str]]:
        return label_task_problems(task, "ClaPS scores label log-probs")

    # -- steps ------------------------------------------------------------------------------------------

    @property
    def prune_steps(self) -> int:
        return math.ceil(self.params.n_clusters / self.params.prune_chunk)

    @property
    def search_steps(self) -> int:
        return self.params.prompt_length if self.params.search == "greedy" else self.params.n_epochs

    @property
    def total_steps(self) -> int:
        return 1 + self.prune_steps + self.search_steps

    @classmethod
    def expected_calls(cls, params: ClapsParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        p = params
        s, reps = cls.scoring_set_size(p, n_train), p.n_clusters
        if p.search == "greedy":
            pruned = max(p.min_pruned, math.ceil((1 - p.percentile / 100) * reps))
            search, selections = (p.prompt_length - 1) * pruned * s, p.prompt_length
        else:
            search = p.population_size * s + (p.n_epochs - 1) * (p.n_mutants + p.n_crossovers) * s
            selections = p.n_epochs
        return 2 * s + reps * s + search + (1 + selections) * n_dev

    # -- state ------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "empty": self.empty,
            "vocabulary": self.vocabulary,
            "representatives": self.representatives,
            "influence": list(self.influence),
            "pruned": self.pruned,
            "tokens": list(self.tokens),
            "population": self.population,
            "history": [dict(h) for h in self.history],
            "scored": {k: v.to_json() for k, v in self.scored.items()},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.empty = state["empty"]
        self.vocabulary = state["vocabulary"]
        self.representatives = state["representatives"]
        self.influence = list(state["influence"])
        self.pruned = state["pruned"]
        self.tokens = [int(t) for t in state["tokens"]]
        self.population = state["population"]
        self.history = [dict(h) for h in state["history"]]
        self.scored = {k: ScoredPrompt.from_json(v) for k, v in state["scored"].items()}

    # -- helpers ----------------------------------------------------------------------------------------

    @staticmethod
    def gold(ctx: OptimizerContext, examples: list[Example]) -> list[int]:
        labels = ctx.evaluator.task.labels or []
        index = {label.strip().lower(): i for i, label in enumerate(labels)}
        try:
            return [index[ex.target.strip().lower()] for ex in examples]
        except KeyError as exc:
            raise ValueError(f"target {exc.args[0]!r} is not among the task's labels") from None

    def text(self, tokens: list[int]) -> str:
        assert self.pruned is not None
        return prompt_text([self.pruned[t] for t in tokens])

    async def evaluate(
        self, ctx: OptimizerContext, texts: list[str], step: int, examples: list[Example], phase: str
    ) -> tuple[dict[str, list[list[float]]], list[CandidateResult]]:
        """Label log-probs of the distinct `texts` in one batch; texts not scored before are recorded and
        returned as candidates."""
        unique = list(dict.fromkeys(texts))
        if not unique:
            return {}, []
        gold = self.gold(ctx, examples)
        per_prompt = await ctx.evaluator.label_logprobs(unique, examples)
        results = []
        for text, logprobs in zip(unique, per_prompt, strict=True):
            if text in self.scored:
                continue
            reward, accuracy = reward_and_accuracy(logprobs, gold)
            self.scored[text] = ScoredPrompt(reward, accuracy, step)
            # Only the search's own strings may become the job's best; the rest are reference points.
            eligible = phase in ("greedy", "genetic")
            details = {"reward": round(reward, 6), "phase": phase}
            results.append(CandidateResult(text, accuracy, step, details, eligible=eligible))
        return dict(zip(unique, per_prompt, strict=True)), results

    def rank_key(self, text: str) -> tuple[float, float]:
        scored = self.scored[text]
        return scored.objective, scored.score

    def report(self, step: int, candidates: list[CandidateResult], message: str) -> StepReport:
        """The leader (for dev selection) is the eligible candidate with the highest train accuracy, ties by
        reward."""
        eligible = [i for i, c in enumerate(candidates) if c.eligible]
        leader = None
        if eligible:
            leader = max(eligible, key=lambda i: (candidates[i].score, self.scored[candidates[i].prompt].objective))
        return StepReport(step, candidates, message=message, leader=leader)

    def best(self) -> CandidateResult | None:
        """The best searched string so far by reward (ties: accuracy, then the earlier)."""
        if not self.history:
            return None
        top = max(self.history, key=lambda h: (h["reward"], h["accuracy"]))
        return CandidateResult(top["prompt"], top["accuracy"], int(top["step"]), {"reward": top["reward"]})

    # -- the step ---------------------------------------------------------------------------------------

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        if step == 1:
            return await self._cluster(ctx)
        if step < 2 + self.prune_steps:
            return await self._prune(ctx, step, step - 2)
        if self.params.search == "greedy":
            return await self._greedy(ctx, step, step - 2 - self.prune_steps)
        return await self._genetic(ctx, step, step - 2 - self.prune_steps)

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        problems = self.check_task({"metric": ctx.evaluator.task.metric, "labels": ctx.evaluator.task.labels})
        if problems:
            raise ValueError(problems[0][1])
        if not ctx.evaluator.uses_label_logprobs:
            raise ValueError("ClaPS needs a scorer backend with label log-probs")
        examples = self.scoring_examples(ctx)
        logprobs, results = await self.evaluate(ctx, [ctx.initial_prompt, ""], 0, examples, "baseline")
        empty = self.scored[""]
        self.empty = {"reward": empty.objective, "accuracy": empty.score, "logprobs": logprobs[""]}
        reward, accuracy = empty.objective, empty.score
        # The manual prompt alone: the engine takes step 0's leader as the job's initial prompt.
        initial = [r for r in results if r.prompt == ctx.initial_prompt]
        for r in initial:
            r.details["origin"] = "initial"
            r.eligible = True
        message = (
            f"manual and empty prompts scored on {len(examples)} examples "
            f"(empty: reward {reward:.4f}, accuracy {accuracy:.3f})"
        )
        return self.report(0, initial, message)

    async def _cluster(self, ctx: OptimizerContext) -> StepReport:
        p = self.params
        llm = ctx.evaluator.llm
        source = "token_embeddings" if Capability.TOKEN_EMBEDDINGS in llm.info.capabilities else "sentence_embeddings"
        settings = {"version": _VOCABULARY_VERSION, "source": source, "n_clusters": p.n_clusters, "seed": p.kmeans_seed}

        async def compute() -> dict[str, Any]:
            if source == "token_embeddings":
                pieces, texts, matrix = await llm.token_embeddings()
                words, ids = word_start_tokens(pieces, texts)
                embeddings = matrix[ids]
            else:
                from app.llm import sentence_embeddings

                bare, embeddings = await asyncio.to_thread(sentence_embeddings.word_embeddings)
                words = [" " + w for w in bare]
            reps = await asyncio.to_thread(cluster_representatives, words, embeddings, p.n_clusters, p.kmeans_seed)
            return {"words": reps, "source": source, "vocabulary": len(words)}

        value = await llm.memoize(VOCABULARY_CACHE_KIND, settings, compute)
        self.representatives = list(value["words"])
        self.vocabulary = {"source": value["source"], "size": value["vocabulary"]}
        self.influence = [None] * len(self.representatives)
        message = f"clustered {value['vocabulary']} words ({source}) into {len(self.representatives)} representatives"
        assert self.empty is not None
        empty = CandidateResult(
            "",
            self.empty["accuracy"],
            1,
            {"reward": round(self.empty["reward"], 6), "phase": "baseline", "origin": "empty"},
            eligible=False,
        )
        return self.report(1, [empty] if ctx.initial_prompt else [], message)

    async def _prune(self, ctx: OptimizerContext, step: int, chunk: int) -> StepReport:
        assert self.representatives is not None and self.empty is not None
        p = self.params
        start = chunk * p.prune_chunk
        indices = list(range(start, min(start + p.prune_chunk, len(self.representatives))))
        texts = [prompt_text([self.representatives[i]]) for i in indices]
        examples = self.scoring_examples(ctx)
        logprobs, results = await self.evaluate(ctx, texts, step, examples, "prune")
        for i, text in zip(indices, texts, strict=True):
            if p.prune_type == "reward":
                self.influence[i] = self.scored[text].objective - self.empty["reward"]
            else:
                self.influence[i] = kl_divergence(logprobs[text], self.empty["logprobs"])
        influence_of = {text: self.influence[i] for i, text in zip(indices, texts, strict=True)}
        for r in results:
            r.details["influence"] = round(influence_of[r.prompt], 6)
        message = f"pruning {chunk + 1}/{self.prune_steps}: {len(indices)} representatives scored"
        if chunk == self.prune_steps - 1:
            assert all(v is not None for v in self.influence)
            kept = prune(self.influence, p.percentile, p.min_pruned)  # type: ignore[arg-type]
            self.pruned = [self.representatives[i] for i in kept]
            message += f"; kept {len(self.pruned)} of {len(self.representatives)}: " + ", ".join(
                repr(w.strip()) for w in self.pruned[:10]
            )
        return self.report(step, results, message)

    def _record(self, step: int, text: str, results: list[CandidateResult], phase: str) -> dict[str, Any]:
        """Keep the step's best string in the history. A best string first scored at an earlier search step (a
        genetic elite) is reported again as this step's output, so the engine can select it; one first scored
        while pruning (greedy's first position picks a pruning word) is not: pruning words are never returned."""
        scored = self.scored[text]
        entry = {"step": step, "prompt": text, "reward": scored.objective, "accuracy": scored.score}
        self.history.append(entry)
        searched = scored.step >= 2 + self.prune_steps
        if searched and all(r.prompt != text for r in results):
            details = {"reward": round(scored.objective, 6), "phase": phase, "first_scored_at": scored.step}
            results.append(CandidateResult(text, scored.score, step, details))
        return entry

    async def _greedy(self, ctx: OptimizerContext, step: int, position: int) -> StepReport:
        assert self.pruned is not None
        examples = self.scoring_examples(ctx)
        strings = [self.tokens + [t] for t in range(len(self.pruned))]
        texts = [self.text(s) for s in strings]
        _, results = await self.evaluate(ctx, [t for t in texts if t not in self.scored], step, examples, "greedy")
        best = max(range(len(strings)), key=lambda t: (*self.rank_key(texts[t]), -t))
        self.tokens = strings[best]
        new = len(results)
        entry = self._record(step, texts[best], results, "greedy")
        message = (
            f"greedy position {position + 1}/{self.params.prompt_length}: {new} new strings; "
            f"best {entry['prompt']!r} reward {entry['reward']:.4f} accuracy {entry['accuracy']:.3f}"
        )
        return self.report(step, results, message)

    async def _genetic(self, ctx: OptimizerContext, step: int, epoch: int) -> StepReport:
        assert self.pruned is not None
        p = self.params
        n_tokens = len(self.pruned)
        if self.population is None:
            rng = derived_rng(self.seed, _SEED_POPULATION)
            self.population = rng.integers(n_tokens, size=(p.population_size, p.prompt_length)).tolist()
        examples = self.scoring_examples(ctx)
        members: dict[str, list[int]] = {}
        for tokens in self.population:
            members.setdefault(self.text(tokens), [int(t) for t in tokens])
        _, results = await self.evaluate(ctx, [t for t in members if t not in self.scored], step, examples, "genetic")
        order = list(members)
        ranked = sorted(range(len(order)), key=lambda i: (*(-v for v in self.rank_key(order[i])), i))
        n_parents = min(len(ranked), max(2, int(p.mutate_frac * p.population_size)))
        parents = [members[order[i]] for i in ranked[:n_parents]]
        new = len(results)
        entry = self._record(step, order[ranked[0]], results, "genetic")
        rng = derived_rng(self.seed, _SEED_GENERATION, epoch)
        self.population = next_generation(parents, n_tokens, p.n_mutants, p.n_crossovers, p.mutation_prob, rng)
        message = (
            f"genetic epoch {epoch + 1}/{p.n_epochs}: {len(members)} strings, {new} new; "
            f"best {entry['prompt']!r} reward {entry['reward']:.4f} accuracy {entry['accuracy']:.3f}"
        )
        return self.report(step, results, message)
