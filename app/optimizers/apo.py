"""APO / ProTeGi - Prompt Optimization with Textual Gradients (Pryzant et al., EMNLP 2023, arXiv 2305.03495).

Beam search over instructions. Each round expands every beam member by "textual gradient descent": run it on
a shared minibatch, show its errors to the optimizer LLM and ask why it failed (the *gradient*), ask for a
rewrite that fixes that (the *step*), and add Monte-Carlo paraphrases of each rewrite and of the parent. The
beam and its successors then compete in a best-arm-identification selection (brute force, UCB, UCB-E,
successive rejects or successive halving, see `bandits.py`) and the best `beam_size` form the next beam.
Method note: docs/methods/apo.md.

Adaptation to this service:

* The edited part is the instruction (the task template's `{prompt}` slot); the template stays fixed.
* Errors are the minibatch examples whose metric is below 1 under the task's own evaluator, so any task the
  evaluator scores (multi-class labels via log-probs or label parsing, exact match, ...) works, not only Yes/No.
* Every optimizer request carries a seed derived from (job seed, round, request kind, parent, index), and every
  random choice of a round (minibatch, error blocks, expansion cap, selection samples) comes from generators
  seeded with (job seed, purpose, round): a resumed round replays identically and cached answers are re-used.
* Each bandit round sends all its (arm x example) evaluations in one evaluator call.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.evaluation.task import Example
from app.llm.port import Capability, Generation, GenerationRequest
from app.optimizers import bandits
from app.optimizers.base import (
    CandidateResult,
    MethodParams,
    Optimizer,
    OptimizerContext,
    SeenInstructions,
    StepReport,
    derived_rng,
    derived_seed,
    instruction_hash,
    settle,
)
from app.optimizers.demonstrations import DemonstrationsParams, demonstrations_field, search_calls

Expansion = Literal["random", "reject_on_errors"]

# Purpose tags mixed into the derived seeds so the random streams never coincide.
_SEED_MINIBATCH = 11
_SEED_ERRORS = 12
_SEED_REQUEST = 13
_SEED_CAP = 14
_SEED_SELECT = 15
_SEED_BANDIT = 16

# Request kinds (part of the request seed).
KIND_GRADIENT = 1
KIND_EDIT = 2
KIND_PARAPHRASE = 3

_DETAIL_CHARS = 300


class ApoParams(MethodParams):
    rounds: int = Field(6, ge=0, le=100, description="Expansion + selection rounds after scoring the initial prompt.")
    beam_size: int = Field(4, ge=1, le=32, description="Prompts kept after each selection.")
    minibatch_size: int = Field(
        64, ge=1, le=4096, description="Training examples per round on which the beam's errors are collected."
    )
    n_gradients: int = Field(4, ge=0, le=32, description="Gradient (critique) requests per beam member.")
    errors_per_gradient: int = Field(4, ge=1, le=64, description="Errors shown in each gradient request.")
    gradients_per_error: int = Field(1, ge=1, le=8, description="Reasons asked for in each gradient request.")
    steps_per_gradient: int = Field(1, ge=1, le=8, description="Improved prompts asked for per reason.")
    mc_samples_per_step: int = Field(
        2, ge=0, le=16, description="Paraphrases of every rewritten prompt and of the parent (one request each)."
    )
    max_expansion_factor: int = Field(8, ge=1, le=128, description="Most successors kept per beam member.")
    expansion: Expansion = Field(
        "random",
        description="Over the cap: keep a random subset ('random'), or sample up to twice the cap, score them "
        "on the parent's minibatch errors and keep the ones fixing most ('reject_on_errors').",
    )
    reject_max_errors: int = Field(
        16, ge=1, le=1024, description="reject_on_errors: at most this many of the parent's errors are used."
    )
    selection: bandits.Strategy = Field(
        "bf",
        description="Candidate selection: 'bf' brute force, 'ucb', 'ucb-e', 'sr' successive rejects, "
        "'sh' successive halving.",
    )
    samples_per_eval: int = Field(32, ge=1, le=4096, description="Examples per arm per bandit pull (ucb, ucb-e).")
    eval_rounds: int = Field(8, ge=1, le=1000, description="Bandit rounds (ucb, ucb-e).")
    eval_prompts_per_round: int = Field(8, ge=1, le=256, description="Arms pulled per bandit round (ucb, ucb-e).")
    eval_budget: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Example evaluations per selection (None: samples_per_eval x eval_rounds x "
        "eval_prompts_per_round = 2048 with the defaults). For ucb/ucb-e it sets the number of bandit rounds.",
    )
    ucb_c: float = Field(1.0, ge=0.0, le=100.0, description="Exploration weight c of UCB and UCB-E.")
    ucb_e_a: float = Field(1.0, gt=0.0, le=1000.0, description="UCB-E exploration parameter a: bonus c*sqrt(a/n).")
    sr_min_samples: int = Field(
        4, ge=1, le=1024, description="Fewest new samples per arm per successive-rejects phase."
    )
    optimizer_temperature: float = Field(0.7, ge=0.0, le=2.0, description="Temperature of optimizer calls.")
    optimizer_max_tokens: int = Field(1024, ge=8, le=8192, description="Max new tokens per optimizer call.")
    max_instruction_chars: int = Field(2000, ge=1, le=20_000, description="Longer proposed instructions are dropped.")
    error_input_chars: int = Field(600, ge=20, le=20_000, description="Each error's input is cut to this many chars.")
    demonstrations: DemonstrationsParams | None = demonstrations_field()

    @property
    def budget(self) -> int:
        if self.eval_budget is not None:
            return self.eval_budget
        return self.samples_per_eval * self.eval_rounds * self.eval_prompts_per_round


_PAPER: dict[str, Any] = {
    "rounds": 6,
    "beam_size": 4,
    "minibatch_size": 64,
    "n_gradients": 4,
    "errors_per_gradient": 4,
    "gradients_per_error": 1,
    "steps_per_gradient": 1,
    "mc_samples_per_step": 2,
    "max_expansion_factor": 8,
    "expansion": "random",
    "selection": "bf",
    "samples_per_eval": 32,
    "eval_rounds": 8,
    "eval_prompts_per_round": 8,
    "ucb_c": 1.0,
    "optimizer_temperature": 0.7,
    "optimizer_max_tokens": 1024,
}

_SMALL: dict[str, Any] = {
    "rounds": 2,
    "beam_size": 2,
    "minibatch_size": 8,
    "n_gradients": 1,
    "errors_per_gradient": 3,
    "gradients_per_error": 1,
    "steps_per_gradient": 1,
    "mc_samples_per_step": 1,
    "max_expansion_factor": 4,
    "expansion": "random",
    "selection": "bf",
    "samples_per_eval": 8,
    "eval_rounds": 4,
    "eval_prompts_per_round": 4,
    "ucb_c": 1.0,
    "optimizer_temperature": 0.7,
    "optimizer_max_tokens": 96,
    "max_instruction_chars": 400,
    "error_input_chars": 300,
}


# ----------------------------------------------------------------------------------------------------------
# Parsing


_SPAN = re.compile(r"<START>(.*?)<END>", re.IGNORECASE | re.DOTALL)
_START = re.compile(r"<START>", re.IGNORECASE)
_END = re.compile(r"<END>", re.IGNORECASE)
_LEAD = re.compile(
    r"^\s*(?:[-*\u2022]+\s+|\d+[.)]\s+|(?:output|new prompt|improved prompt|prompt|instruction|reason)\s*\d*\s*:\s*)",
    re.IGNORECASE,
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def _clean(text: str) -> str:
    text = text.replace("**", "").strip()
    for _ in range(3):
        before = text
        text = _LEAD.sub("", text).strip().strip(_QUOTES).strip()
        if text == before:
            break
    return text


def first_paragraph(text: str) -> str:
    for block in re.split(r"\n\s*\n", text.strip()):
        cleaned = _clean(block)
        if cleaned:
            return cleaned
    return ""


def parse_tagged(text: str, fallback: Literal["whole", "paragraph"] = "paragraph") -> list[str]:
    """Every `<START>...<END>` span; tolerant of missing tags.

    Complete spans win. Otherwise an unclosed `<START>` yields the text after it, a lone `<END>` the text
    before it, and an untagged reply the whole text (`fallback="whole"`, used for gradients) or its first
    paragraph (`"paragraph"`, used for prompts). Empty results are dropped.
    """
    if not text:
        return []
    spans = [_clean(m) for m in _SPAN.findall(text)]
    spans = [s for s in spans if s]
    if spans:
        return spans
    start = _START.search(text)
    if start:
        rest = _END.split(text[start.end() :])[0]
        found = rest.strip() if fallback == "whole" else first_paragraph(rest)
        found = _clean(found)
        return [found] if found else []
    end = _END.search(text)
    if end:
        text = text[: end.start()]
    found = _clean(text) if fallback == "whole" else first_paragraph(text)
    return [found] if found else []


# ----------------------------------------------------------------------------------------------------------
# Optimizer prompts (the paper's gradient, edit and paraphrase prompts, worded here)


def error_block(errors: list[tuple[Example, str]], max_chars: int) -> str:
    parts = []
    for i, (example, prediction) in enumerate(errors, start=1):
        text = example.input if len(example.input) <= max_chars else example.input[:max_chars] + "..."
        parts.append(f"## Example {i}\nInput: {text}\nCorrect answer: {example.target}\nPrediction: {prediction}")
    return "\n\n".join(parts)


def gradient_prompt(instruction: str, errors: str, n_reasons: int) -> str:
    return (
        "I'm trying to write a zero-shot instruction for a language model.\n\n"
        f'My current instruction is:\n"{instruction}"\n\n'
        f"But this instruction gets the following examples wrong:\n\n{errors}\n\n"
        f"Give {n_reasons} reason{'s' if n_reasons != 1 else ''} why the instruction could have gotten these "
        "examples wrong. Wrap each reason with <START> and <END>."
    )


def edit_prompt(instruction: str, errors: str, gradient: str, n_steps: int) -> str:
    plural = "s" if n_steps != 1 else ""
    return (
        "I'm trying to write a zero-shot instruction for a language model.\n\n"
        f'My current instruction is:\n"{instruction}"\n\n'
        f"But it gets the following examples wrong:\n\n{errors}\n\n"
        f"Based on these examples the problem with this instruction is that: {gradient}\n\n"
        f"Based on the above information, I wrote {n_steps} different improved instruction{plural}. "
        f"Each instruction is wrapped with <START> and <END>.\n\n"
        f"The {n_steps} new instruction{plural}:"
    )


def paraphrase_prompt(instruction: str) -> str:
    return (
        "Generate a variation of the following instruction while keeping the semantic meaning.\n\n"
        f"Input: {instruction}\n\nOutput:"
    )


# ----------------------------------------------------------------------------------------------------------
# Seeds


def request_seed(seed: int, rnd: int, kind: int, parent: int, index: int, sub: int = 0) -> int:
    """Sampling seed of one optimizer request."""
    return derived_seed(seed, _SEED_REQUEST, rnd, kind, parent, index, sub)


# ----------------------------------------------------------------------------------------------------------
# Expansion result


@dataclass(slots=True)
class Successor:
    instruction: str
    origin: str  # "edit" | "paraphrase"
    parent: int  # beam index
    gradient: str | None = None


@dataclass(slots=True)
class ExpansionResult:
    successors: list[Successor]
    stats: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# The optimizer


class Apo(Optimizer):
    method: ClassVar[str] = "apo"
    params_model: ClassVar[type[MethodParams]] = ApoParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset()
    optimizer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.GENERATE})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER, "small": _SMALL}

    params: ApoParams

    def __init__(self, params: ApoParams, seed: int) -> None:
        super().__init__(params, seed)
        # Beam entries: {"instruction", "score", "n", "step"} - best first.
        self.beam: list[dict[str, Any]] = []
        self.seen = SeenInstructions()

    @property
    def total_steps(self) -> int:
        return self.params.rounds

    @classmethod
    def expected_calls(cls, params: ApoParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        p = params

        def selection(arms: int) -> int:
            if p.selection in ("ucb", "ucb-e"):
                return p.eval_rounds * min(p.eval_prompts_per_round, arms) * min(p.samples_per_eval, n_train)
            if p.selection == "bf":
                return arms * max(1, min(n_train, p.budget // arms))
            return min(p.budget, arms * n_train)  # successive rejects / halving spend about the budget

        per_parent_requests = (
            p.n_gradients
            + p.n_gradients * p.gradients_per_error
            + p.mc_samples_per_step * (1 + p.n_gradients * p.gradients_per_error * p.steps_per_gradient)
        )
        total = selection(1)
        for rnd in range(1, p.rounds + 1):
            parents = 1 if rnd == 1 else p.beam_size
            arms = parents * (1 + p.max_expansion_factor)
            total += parents * min(p.minibatch_size, n_train) + parents * per_parent_requests + selection(arms)
        return total + (p.rounds + 1) * n_dev + search_calls(p, cls.scoring_set_size(p, n_train))

    # -- state ------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {"beam": [dict(b) for b in self.beam], "seen": self.seen.to_list()}

    def _load_state(self, state: dict[str, Any]) -> None:
        self.beam = [dict(b) for b in state["beam"]]
        self.seen = SeenInstructions(state["seen"])

    def best(self) -> CandidateResult | None:
        if not self.beam:
            return None
        top = max(self.beam, key=lambda b: b["score"])
        return CandidateResult(top["instruction"], top["score"], top["step"])

    # -- helpers ----------------------------------------------------------------------------------------

    def _request(self, prompt: str, rnd: int, kind: int, parent: int, index: int, sub: int = 0) -> GenerationRequest:
        return GenerationRequest(
            prompt,
            max_tokens=self.params.optimizer_max_tokens,
            temperature=self.params.optimizer_temperature,
            seed=request_seed(self.seed, rnd, kind, parent, index, sub),
        )

    def minibatch(self, train: list[Example], rnd: int) -> list[Example]:
        size = min(self.params.minibatch_size, len(train))
        picked = derived_rng(self.seed, _SEED_MINIBATCH, rnd).choice(len(train), size=size, replace=False)
        return [train[int(i)] for i in sorted(picked)]

    def _acceptable(self, instruction: str) -> bool:
        return bool(instruction) and len(instruction) <= self.params.max_instruction_chars

    # -- expansion --------------------------------------------------------------------------------------

    async def expand(self, ctx: OptimizerContext, rnd: int, parents: list[str]) -> ExpansionResult:
        """Successors of every parent, de-duplicated against everything seen and capped per parent."""
        p = self.params
        train = ctx.evaluator.task.split_examples("train")
        batch = self.minibatch(train, rnd)
        stats = {"errors": 0, "gradients": 0, "edits": 0, "paraphrases": 0, "duplicates": 0, "rejected": 0}
        stats.update({"capped": 0, "requests": 0})
        # Paraphrases of the parents themselves depend on nothing below, so they are generated while the parents
        # are scored and their gradients and edits written: one generation phase less on the step's critical path.
        parent_para_jobs: list[tuple[int, str | None]] = []
        parent_para_requests: list[GenerationRequest] = []
        for pi, parent in enumerate(parents):
            for sample in range(p.mc_samples_per_step):
                parent_para_jobs.append((pi, None))
                parent_para_requests.append(
                    self._request(paraphrase_prompt(parent), rnd, KIND_PARAPHRASE, pi, 0, sample)
                )
        parent_paraphrasing = (
            asyncio.create_task(ctx.optimizer_llm.generate(parent_para_requests)) if parent_para_requests else None
        )
        try:
            return await self._expand(ctx, rnd, parents, batch, stats, parent_para_jobs, parent_paraphrasing)
        except BaseException as exc:
            await settle([parent_paraphrasing] if parent_paraphrasing is not None else [], exc)
            raise

    async def _expand(self, ctx, rnd, parents, batch, stats, parent_para_jobs, parent_paraphrasing) -> ExpansionResult:
        p = self.params
        scored = await ctx.evaluator.score(parents, split="train", examples=batch) if batch else []
        errors: list[list[tuple[Example, str]]] = []
        for pi in range(len(parents)):
            if not batch:
                errors.append([])
                continue
            s = scored[pi]
            errs = [(batch[j], s.predictions[j]) for j, v in enumerate(s.per_example) if v < 1.0]
            errors.append(errs)
            stats["errors"] += len(errs)

        # 1. gradients: n_gradients requests per parent, each with its own error block.
        grad_jobs: list[tuple[int, int, str]] = []  # (parent, g, error block text)
        grad_requests: list[GenerationRequest] = []
        for pi, parent in enumerate(parents):
            errs = errors[pi]
            if not errs:
                continue
            for g in range(p.n_gradients):
                rng = derived_rng(self.seed, _SEED_ERRORS, rnd, pi, g)
                k = min(p.errors_per_gradient, len(errs))
                picks = sorted(int(i) for i in rng.choice(len(errs), size=k, replace=False))
                block = error_block([errs[i] for i in picks], p.error_input_chars)
                grad_jobs.append((pi, g, block))
                grad_requests.append(
                    self._request(gradient_prompt(parent, block, p.gradients_per_error), rnd, KIND_GRADIENT, pi, g)
                )
        gradients: list[tuple[int, int, int, str, str]] = []  # (parent, g, j, block, reason)
        if grad_requests:
            stats["requests"] += len(grad_requests)
            replies = await ctx.optimizer_llm.generate(grad_requests)
            for (pi, g, block), reply in zip(grad_jobs, replies, strict=True):
                text = reply.texts[0] if reply.texts else ""
                for j, reason in enumerate(parse_tagged(text, "whole")[: p.gradients_per_error]):
                    gradients.append((pi, g, j, block, reason))
        stats["gradients"] = len(gradients)

        # 2. steps: one edit request per reason, asking for steps_per_gradient rewrites.
        edits: dict[int, list[tuple[str, str]]] = {pi: [] for pi in range(len(parents))}  # (instruction, reason)
        if gradients:
            edit_requests = [
                self._request(edit_prompt(parents[pi], block, reason, p.steps_per_gradient), rnd, KIND_EDIT, pi, g, j)
                for pi, g, j, block, reason in gradients
            ]
            stats["requests"] += len(edit_requests)
            replies = await ctx.optimizer_llm.generate(edit_requests)
            for (pi, _g, _j, _block, reason), reply in zip(gradients, replies, strict=True):
                text = reply.texts[0] if reply.texts else ""
                for new in parse_tagged(text, "paragraph")[: p.steps_per_gradient]:
                    edits[pi].append((new, reason))
                    stats["edits"] += 1

        # 3. Monte-Carlo paraphrases of every rewrite (those of the parents are already under way).
        para_jobs: list[tuple[int, str | None]] = []  # (parent, reason of the source edit)
        para_requests: list[GenerationRequest] = []
        if p.mc_samples_per_step > 0:
            for pi in range(len(parents)):
                for e, (source, reason) in enumerate(edits[pi], start=1):
                    for sample in range(p.mc_samples_per_step):
                        para_jobs.append((pi, reason))
                        para_requests.append(
                            self._request(paraphrase_prompt(source), rnd, KIND_PARAPHRASE, pi, e, sample)
                        )
        # Per parent: its own paraphrases first, then its edits', as one list of requests would give them.
        replies: list[Generation] = []
        if parent_paraphrasing is not None:
            stats["requests"] += len(parent_para_jobs)
            replies += await parent_paraphrasing
        if para_requests:
            stats["requests"] += len(para_requests)
            replies += await ctx.optimizer_llm.generate(para_requests)
        paraphrases: dict[int, list[tuple[str, str | None]]] = {pi: [] for pi in range(len(parents))}
        if replies:
            for (pi, reason), reply in zip(parent_para_jobs + para_jobs, replies, strict=True):
                text = reply.texts[0] if reply.texts else ""
                found = parse_tagged(text, "paragraph")
                if found:
                    paraphrases[pi].append((found[0], reason))
                    stats["paraphrases"] += 1

        # 4. de-duplicate against everything seen (and this round), filter, cap per parent.
        taken = self.seen.hashes() | {instruction_hash(x) for x in parents}
        successors: list[Successor] = []
        for pi in range(len(parents)):
            mine: list[Successor] = []
            for origin, items in (("edit", edits[pi]), ("paraphrase", paraphrases[pi])):
                for instruction, reason in items:
                    if not self._acceptable(instruction):
                        stats["rejected"] += 1
                        continue
                    digest = instruction_hash(instruction)
                    if digest in taken:
                        stats["duplicates"] += 1
                        continue
                    taken.add(digest)
                    mine.append(Successor(instruction, origin, pi, reason))
            if len(mine) > p.max_expansion_factor:
                kept = await self._cap(ctx, rnd, pi, mine, errors[pi])
                stats["capped"] += len(mine) - len(kept)
                mine = kept
            successors.extend(mine)
        return ExpansionResult(successors, stats)

    async def _cap(
        self, ctx: OptimizerContext, rnd: int, pi: int, mine: list[Successor], errs: list[tuple[Example, str]]
    ) -> list[Successor]:
        p = self.params
        cap = p.max_expansion_factor
        rng = derived_rng(self.seed, _SEED_CAP, rnd, pi)
        if p.expansion == "random" or not errs:
            picks = sorted(int(i) for i in rng.choice(len(mine), size=cap, replace=False))
            return [mine[i] for i in picks]
        # reject_on_errors: up to twice the cap at random, scored on the parent's errors; keep the best.
        pool_n = min(len(mine), 2 * cap)
        pool = [mine[int(i)] for i in sorted(rng.choice(len(mine), size=pool_n, replace=False))]
        error_examples = [ex for ex, _ in errs[: p.reject_max_errors]]
        scores = await ctx.evaluator.score([s.instruction for s in pool], split="train", examples=error_examples)
        order = sorted(range(len(pool)), key=lambda i: (-scores[i].score, i))[:cap]
        return [pool[i] for i in sorted(order)]

    # -- selection --------------------------------------------------------------------------------------

    async def select(
        self, ctx: OptimizerContext, rnd: int, prompts: list[str]
    ) -> tuple[bandits.BanditResult, list[int]]:
        """Run the configured selection over `prompts`; returns the result and examples seen per arm."""
        p = self.params
        train = ctx.evaluator.task.split_examples("train")
        sample_rng = derived_rng(self.seed, _SEED_SELECT, rnd)

        async def pull(arms: list[int], k: int) -> list[list[float]]:
            size = min(k, len(train))
            picks = sorted(int(i) for i in sample_rng.choice(len(train), size=size, replace=False))
            examples = [train[i] for i in picks]
            scores = await ctx.evaluator.score([prompts[a] for a in arms], split="train", examples=examples)
            return [list(s.per_example) for s in scores]

        budget = p.budget
        arms_per_round = min(p.eval_prompts_per_round, len(prompts))
        eval_rounds = p.eval_rounds
        if p.eval_budget is not None:
            eval_rounds = max(1, p.eval_budget // (max(arms_per_round, 1) * p.samples_per_eval))
        result = await bandits.select(
            p.selection,
            len(prompts),
            p.beam_size,
            pull,
            derived_rng(self.seed, _SEED_BANDIT, rnd),
            budget=budget,
            pool_size=len(train),
            eval_rounds=eval_rounds,
            arms_per_round=arms_per_round,
            samples_per_eval=p.samples_per_eval,
            c=p.ucb_c,
            a=p.ucb_e_a,
            min_samples=p.sr_min_samples,
        )
        return result, result.counts

    # -- the step ---------------------------------------------------------------------------------------

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        # Scored by the same selection routine as every later beam, so the scores compare.
        initial = ctx.initial_prompt
        result, counts = await self.select(ctx, 0, [initial])
        score = result.means[0]
        self.beam = [{"instruction": initial, "score": score, "n": counts[0], "step": 0}]
        self.seen.add(initial)
        report = CandidateResult(initial, score, 0, {"origin": "initial", "n": counts[0], "in_beam": True})
        return StepReport(0, [report], message=f"initial prompt scored on {counts[0]} examples")

    async def search_step(self, ctx: OptimizerContext, rnd: int) -> StepReport:
        parents = [b["instruction"] for b in self.beam]
        expansion = await self.expand(ctx, rnd, parents)
        prompts = parents + [s.instruction for s in expansion.successors]
        origin: list[dict[str, Any]] = [{"origin": "beam"} for _ in parents]
        for s in expansion.successors:
            info: dict[str, Any] = {"origin": s.origin, "parent": s.parent}
            if s.gradient:
                info["gradient"] = s.gradient[:_DETAIL_CHARS]
            origin.append(info)

        result, counts = await self.select(ctx, rnd, prompts)
        top = set(result.top)
        candidates = []
        for i, prompt in enumerate(prompts):
            self.seen.add(prompt)
            if counts[i] == 0:
                continue  # never evaluated (a bandit may leave arms unpulled)
            details = {**origin[i], "n": counts[i], "in_beam": i in top, "selection": self.params.selection}
            candidates.append(CandidateResult(prompt, float(result.means[i]), rnd, details))
        self.beam = [
            {"instruction": prompts[i], "score": float(result.means[i]), "n": counts[i], "step": rnd}
            for i in result.top
        ]
        st = expansion.stats
        message = (
            f"{len(parents)} parents, {st['errors']} errors, {st['gradients']} gradients, {st['edits']} edits, "
            f"{st['paraphrases']} paraphrases, {len(expansion.successors)} new successors "
            f"({st['duplicates']} duplicates, {st['capped']} over the cap); {self.params.selection} used "
            f"{result.spent} evaluations in {result.batches} batches"
        )
        return StepReport(rnd, candidates, message=message)
