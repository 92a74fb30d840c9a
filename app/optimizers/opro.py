"""OPRO - Optimization by PROmpting (Yang et al., ICLR 2024, arXiv 2309.03409).

An optimizer LLM reads a meta-prompt listing earlier instructions with their training scores (ascending,
best last) plus a few example problems with an `<INS>` placeholder where the instruction goes, and proposes
new instructions. Survivors of the de-duplication and sanity filters are scored by the evaluator and join
the trajectory. Method note: docs/methods/opro.md.

Adaptation to this service:

* The instruction is the `{prompt}` slot of the task template; the evaluator always renders the task's own
  template. `instruction_position` only changes how the meta-prompt *shows* the placeholder in the exemplars:
  `"template"` renders the task template with `{prompt}` -> `<INS>`; the classic OPRO positions
  (`before_Q`, `Q_begin`, `Q_end`, `A_begin`) use OPRO's "Q: ... / A:" frame instead.
* Scores are the evaluator's 0..1 mean metric (label accuracy via log-probs or generation, exact match, ...);
  the meta-prompt shows them as integers 0-100, as OPRO's 100 score buckets do.
* The optimizer's sampled requests carry a seed derived from (job seed, step, index), so they are
  deterministic and cacheable: a step re-run after a crash re-uses the answers already paid for.
* Exemplar picks for step `s` come from a generator seeded with (job seed, s), so a resumed job picks the same
  exemplars (OPRO's `random` criterion re-seeds numpy with the step index every step).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, ClassVar, Literal

from pydantic import Field

from app.evaluation.evaluator import PromptScore
from app.evaluation.task import Example
from app.llm.port import Capability, Generation, GenerationRequest
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
    train_subset_field,
)
from app.optimizers.demonstrations import DemonstrationsParams, demonstrations_field, search_calls

ExemplarSelection = Literal["random", "constant", "accumulative_most_frequent", "current_most_frequent"]
InstructionPosition = Literal["template", "before_Q", "Q_begin", "Q_end", "A_begin"]

INS = "<INS>"
INS_CLOSE = "</INS>"

# Purpose tags mixed into the derived seeds so the different random streams never coincide.
_SEED_EXEMPLARS = 1
_SEED_REQUEST = 2
_SEED_CONSTANT = 4

_RAW_DETAIL_CHARS = 300


class OproParams(MethodParams):
    steps: int = Field(200, ge=0, le=10_000, description="Search steps after scoring the initial prompt.")
    candidates_per_step: int = Field(
        8, ge=1, le=64, description="Optimizer samples per step (one request each, seeded)."
    )
    exemplars_per_step: int = Field(
        3, ge=0, le=50, description="Training problems shown in the meta-prompt with the <INS> placeholder."
    )
    exemplar_selection: ExemplarSelection = Field(
        "random",
        description=(
            "How exemplars are picked: 'random' (fresh per step, seeded by job seed and step), 'constant' "
            "(the same every step), 'accumulative_most_frequent' (failed most often by all instructions so "
            "far), 'current_most_frequent' (failed most often by the instructions shown in the meta-prompt)."
        ),
    )
    max_history: int = Field(
        20, ge=1, le=1000, description="Highest-scoring past instructions shown in the meta-prompt."
    )
    history_score_threshold: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Past instructions scoring below this (0..1) are left out of the meta-prompt (OPRO: 0.3 "
        "for GPT scorers, 0.0 for text-bison).",
    )
    optimizer_temperature: float = Field(1.0, ge=0.0, le=2.0, description="Optimizer sampling temperature.")
    optimizer_max_tokens: int = Field(512, ge=8, le=8192, description="Max new tokens per optimizer sample.")
    max_instruction_chars: int = Field(
        500, ge=1, le=20_000, description="Proposed instructions longer than this are dropped."
    )
    forbid_digits: bool = Field(False, description="Drop proposals containing any digit (OPRO does this on GSM8K).")
    instruction_position: InstructionPosition = Field(
        "template",
        description=(
            "How the meta-prompt shows where the instruction goes. 'template': the task template with "
            "{prompt} replaced by <INS>. 'before_Q', 'Q_begin', 'Q_end', 'A_begin': OPRO's classic "
            "'Q: ... / A:' frame with <INS> at that position. Only the meta-prompt changes: candidates are "
            "always scored with the task's own template."
        ),
    )
    train_subset: int | None = train_subset_field("score_on_subset")
    demonstrations: DemonstrationsParams | None = demonstrations_field()


_PAPER = {
    "steps": 200,
    "candidates_per_step": 8,
    "exemplars_per_step": 3,
    "exemplar_selection": "random",
    "max_history": 20,
    "history_score_threshold": 0.0,
    "optimizer_temperature": 1.0,
    "optimizer_max_tokens": 512,
    "max_instruction_chars": 500,
}

_SMALL = {
    "steps": 4,
    "candidates_per_step": 4,
    "exemplars_per_step": 3,
    "exemplar_selection": "random",
    "max_history": 10,
    "history_score_threshold": 0.0,
    "optimizer_temperature": 1.0,
    "optimizer_max_tokens": 60,
    "max_instruction_chars": 300,
}


# ----------------------------------------------------------------------------------------------------------
# Parsing and filtering


_TAGGED = re.compile(r"<INS>(.*?)</INS>", re.IGNORECASE | re.DOTALL)
_OPEN_TAG = re.compile(r"<INS>", re.IGNORECASE)
_BRACKETED = re.compile(r"\[([^\[\]\n]*[^\[\]\s][^\[\]\n]*)\]")
_BULLET = re.compile(r"^\s*(?:[-*\u2022>]+|\d+[.)]|\(\d+\))\s+")
_PREFIX = re.compile(
    r"^\s*(?:(?:new|improved|better|my|final|the)\s+)?(?:instruction|prompt|text|answer)\s*\d*\s*(?::|\s-)\s*",
    re.IGNORECASE,
)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def polish(text: str) -> str:
    """OPRO's clean-up: strip, remove `**`, capitalise the first letter."""
    text = text.strip().replace("**", "").strip()
    return text[:1].upper() + text[1:] if text else text


def _strip_decorations(line: str) -> str:
    line = line.replace("**", "").strip()
    for _ in range(3):
        before = line
        line = _BULLET.sub("", line)
        line = _PREFIX.sub("", line)
        line = line.strip().strip(_QUOTES).strip()
        if line == before:
            break
    return line


def _first_nonempty_line(text: str) -> str:
    for line in text.splitlines():
        cleaned = _strip_decorations(line)
        if cleaned:
            return cleaned
    return ""


def extract_instruction(text: str) -> str:
    """The instruction inside one optimizer reply ('' when none).

    1. text between `<INS>` and `</INS>`; 2. `<INS>` without a closing tag: the rest of that line (or the next
    non-empty line when the tag ends its line); 3. no tag: the first `[...]`; 4. else the first non-empty line,
    with quotes, bullets and "Instruction:"-style prefixes stripped. The result is polished.
    """
    if not text:
        return ""
    match = _TAGGED.search(text)
    if match:
        return polish(match.group(1).strip().strip(_QUOTES))
    match = _OPEN_TAG.search(text)
    if match:
        rest = text[match.end() :]
        line, _, after = rest.partition("\n")
        found = _strip_decorations(line) or _first_nonempty_line(after)
        return polish(found)
    match = _BRACKETED.search(text)
    if match:
        return polish(_strip_decorations(match.group(1)))
    return polish(_first_nonempty_line(text))


def rejection_reason(instruction: str, seen: set[str] | frozenset[str], params: OproParams) -> str | None:
    """Why a parsed candidate is dropped (None: keep it). Order: empty, duplicate, length, INS, digits."""
    if not instruction:
        return "empty"
    if instruction_hash(instruction) in seen:
        return "duplicate"
    if len(instruction) > params.max_instruction_chars:
        return "too_long"
    if "INS" in instruction:
        return "contains_INS"
    if params.forbid_digits and any(ch.isdigit() for ch in instruction):
        return "digit"
    return None


# ----------------------------------------------------------------------------------------------------------
# Meta-prompt


_POSITION_PHRASE = {
    "template": "the instruction is inserted where <INS> appears in each problem",
    "before_Q": "the instruction is placed on its own line before each question",
    "Q_begin": "the instruction is placed at the beginning of each question",
    "Q_end": "the instruction is placed at the end of each question",
    "A_begin": "the instruction is placed at the beginning of each answer, and the model continues from it",
}


def classic_frame(position: str, input_text: str) -> str:
    """OPRO's "Q: ... / A:" frame with the `<INS>` placeholder at `position`."""
    if position == "before_Q":
        return f"{INS}\nQ: {input_text}\n\nA:"
    if position == "Q_begin":
        return f"Q: {INS}\n{input_text}\n\nA:"
    if position == "Q_end":
        return f"Q: {input_text}\n{INS}\n\nA:"
    if position == "A_begin":
        return f"Q: {input_text}\n\nA: {INS}"
    raise ValueError(f"unknown instruction position {position!r}")


def score_bucket(score: float) -> int:
    """A 0..1 score as OPRO shows it: an integer 0..100."""
    return int(round(min(max(score, 0.0), 1.0) * 100))


def trajectory(history: list[dict[str, Any]], max_history: int, threshold: float) -> list[dict[str, Any]]:
    """History entries for the meta-prompt: ascending by score (stable), threshold applied, the last N."""
    ordered = sorted(history, key=lambda h: h["score"])
    kept = [h for h in ordered if h["score"] >= threshold]
    return kept[-max_history:] if max_history > 0 else []


def build_meta_prompt(
    shown: list[dict[str, Any]],
    exemplars: list[tuple[str, str]],
    position: str = "template",
) -> str:
    """Variant A meta-prompt. `shown`: trajectory entries, already ordered; `exemplars`: (problem with the
    `<INS>` placeholder, gold answer) pairs."""
    parts: list[str] = []
    intro = (
        "Your task is to write an instruction, marked <INS> below, that helps a language model answer "
        f"problems like the ones shown correctly; {_POSITION_PHRASE[position]}."
    )
    if shown:
        intro += (
            " Below are earlier instructions, each with its score on the training problems from 0 to 100 "
            "(higher is better), listed from lowest to highest score."
        )
    parts.append(intro)
    if shown:
        parts.append("\n\n".join(f"text:\n{h['instruction']}\nscore:\n{score_bucket(h['score'])}" for h in shown))
    if exemplars:
        parts.append(
            "Below are example problems. In each one, <INS> marks where the instruction goes, and the "
            "expected answer follows."
        )
        parts.append("\n\n".join(f"input:\n{problem}\nGround truth answer:\n{gold}" for problem, gold in exemplars))
    beat = "is different from all the instructions above and scores higher than all of them"
    closing = (f"Write a new instruction that {beat}. " if shown else "Write a new instruction. ") + (
        "Keep it concise, effective and general enough to work on every problem shown. "
        "Write only the instruction, between <INS> and </INS>."
    )
    parts.append(closing)
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------------------
# Seeds


def request_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of optimizer request `index` at `step`."""
    return derived_seed(seed, _SEED_REQUEST, step, index)


# ----------------------------------------------------------------------------------------------------------
# The optimizer


class Opro(Optimizer):
    method: ClassVar[str] = "opro"
    params_model: ClassVar[type[MethodParams]] = OproParams
    scorer_needs: ClassVar[frozenset[Capability]] = frozenset()
    optimizer_needs: ClassVar[frozenset[Capability]] = frozenset({Capability.GENERATE})
    presets: ClassVar[dict[str, dict[str, Any]]] = {"paper": _PAPER, "small": _SMALL}
    subset_purpose: ClassVar[int] = 3

    params: OproParams

    def __init__(self, params: OproParams, seed: int) -> None:
        super().__init__(params, seed)
        # Entries: {"instruction", "score", "step"} (+ "failed": scoring-set positions not fully correct,
        # kept only for the current_most_frequent criterion).
        self.history: list[dict[str, Any]] = []
        self.seen = SeenInstructions()
        # Per scoring-set position: how many scored instructions did not get it fully right.
        self.failures: list[int] = []

    @property
    def total_steps(self) -> int:
        return self.params.steps

    @classmethod
    def expected_calls(cls, params: OproParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        s, n, c = cls.scoring_set_size(params, n_train), params.steps, params.candidates_per_step
        return s + n * c * s + n * c + (n + 1) * n_dev + search_calls(params, s)

    # -- state ------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "seen": self.seen.to_list(),
            "failures": list(self.failures),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.seen = SeenInstructions(state["seen"])
        self.failures = [int(x) for x in state["failures"]]

    # -- results ----------------------------------------------------------------------------------------

    def best(self) -> CandidateResult | None:
        """Highest-scoring instruction so far; ties go to the earliest."""
        if not self.history:
            return None
        top = self.history[0]
        for entry in self.history[1:]:
            if entry["score"] > top["score"]:
                top = entry
        return CandidateResult(top["instruction"], top["score"], top["step"])

    # -- helpers ----------------------------------------------------------------------------------------

    def select_exemplars(self, step: int, n_examples: int) -> list[int]:
        """Positions (in the scoring set) of the exemplars shown at `step`."""
        k = min(self.params.exemplars_per_step, n_examples)
        if k <= 0:
            return []
        criterion = self.params.exemplar_selection
        if criterion == "random":
            rng = derived_rng(self.seed, _SEED_EXEMPLARS, step)
            return [int(i) for i in rng.choice(n_examples, size=k, replace=False)]
        if criterion == "constant":
            rng = derived_rng(self.seed, _SEED_CONSTANT)
            return [int(i) for i in rng.choice(n_examples, size=k, replace=False)]
        if criterion == "accumulative_most_frequent":
            counts = list(self.failures) + [0] * (n_examples - len(self.failures))
        else:  # current_most_frequent: failures of the instructions the meta-prompt shows
            counts = [0] * n_examples
            for entry in self._shown():
                for pos in entry.get("failed", ()):
                    if pos < n_examples:
                        counts[pos] += 1
        # Most failed first; ties broken by a per-step seeded shuffle so they do not always favour index 0.
        tiebreak = derived_rng(self.seed, _SEED_EXEMPLARS, step).permutation(n_examples)
        order = sorted(range(n_examples), key=lambda i: (-counts[i], int(tiebreak[i])))
        return order[:k]

    def _shown(self) -> list[dict[str, Any]]:
        return trajectory(self.history, self.params.max_history, self.params.history_score_threshold)

    def _exemplar_text(self, ctx: OptimizerContext, example: Example) -> str:
        if self.params.instruction_position == "template":
            return ctx.evaluator.render(INS, example)
        return classic_frame(self.params.instruction_position, example.input)

    def meta_prompt(self, ctx: OptimizerContext, step: int) -> tuple[str, list[int]]:
        examples = self.scoring_examples(ctx)
        picks = self.select_exemplars(step, len(examples))
        exemplars = [(self._exemplar_text(ctx, examples[i]), examples[i].target) for i in picks]
        return build_meta_prompt(self._shown(), exemplars, self.params.instruction_position), picks

    def _requests(self, prompt: str, step: int, indices: range) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                prompt,
                max_tokens=self.params.optimizer_max_tokens,
                temperature=self.params.optimizer_temperature,
                seed=request_seed(self.seed, step, i),
            )
            for i in indices
        ]

    async def score_prompts(
        self, ctx: OptimizerContext, instructions: list[str], step: int, examples: list[Example]
    ) -> list[CandidateResult]:
        """Score `instructions` in one evaluator call and append them to the history."""
        scores = await ctx.evaluator.score(instructions, split="train", examples=examples)
        return self._remember(instructions, scores, step, examples)

    def _remember(
        self, instructions: list[str], scores: list[PromptScore], step: int, examples: list[Example]
    ) -> list[CandidateResult]:
        """Append scored instructions to the history (and the failure counts), in the order given."""
        if len(self.failures) < len(examples):
            self.failures += [0] * (len(examples) - len(self.failures))
        keep_failed = self.params.exemplar_selection == "current_most_frequent"
        results = []
        for instruction, scored in zip(instructions, scores, strict=True):
            failed = [pos for pos, value in enumerate(scored.per_example) if value < 1.0]
            for pos in failed:
                self.failures[pos] += 1
            entry: dict[str, Any] = {"instruction": instruction, "score": float(scored.score), "step": step}
            if keep_failed:
                entry["failed"] = failed
            self.history.append(entry)
            self.seen.add(instruction)
            results.append(CandidateResult(instruction, float(scored.score), step))
        return results

    # -- the step ---------------------------------------------------------------------------------------

    async def initial_step(self, ctx: OptimizerContext) -> StepReport:
        report = await super().initial_step(ctx)
        self.seen.add(polish(ctx.initial_prompt))
        return report

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        """Propose, filter, score. Each surviving proposal is scored as soon as its generation arrives, while the
        longer proposals are still being decoded, so the server is not left running a handful of sequences; the
        history is then updated in proposal order, so the step's outcome does not depend on arrival order."""
        examples = self.scoring_examples(ctx)
        prompt, picks = self.meta_prompt(ctx, step)
        wanted = self.params.candidates_per_step
        parsed_count = 0
        reasons: dict[str, int] = {}
        survivors: dict[str, tuple[int, int, str]] = {}  # instruction -> (request, sample, raw text)
        scoring: dict[str, asyncio.Task] = {}
        delivered: set[int] = set()
        step_seen = self.seen.hashes()

        def propose(index: int, generation: Generation) -> None:
            nonlocal parsed_count
            if index in delivered:
                return
            delivered.add(index)
            for sample_index, text in enumerate(generation.texts):
                instruction = extract_instruction(text)
                if not instruction:
                    continue
                parsed_count += 1
                reason = rejection_reason(instruction, step_seen, self.params)
                if reason is not None:
                    reasons[reason] = reasons.get(reason, 0) + 1
                    kept = survivors.get(instruction)
                    if kept is not None and (index, sample_index) < kept[:2]:
                        survivors[instruction] = (index, sample_index, text)  # the first proposal's text, always
                    continue
                step_seen.add(instruction_hash(instruction))
                survivors[instruction] = (index, sample_index, text)
                scoring[instruction] = asyncio.create_task(
                    ctx.evaluator.score([instruction], split="train", examples=examples)
                )

        async def sample(indices: range) -> None:
            requests = self._requests(prompt, step, indices)
            generations = await ctx.optimizer_llm.generate(
                requests, on_result=lambda i, generation: propose(indices.start + i, generation)
            )
            for i, generation in enumerate(generations):  # answers a backend did not report one by one
                propose(indices.start + i, generation)

        try:
            await sample(range(wanted))
            if parsed_count < wanted:
                # One extra, also seeded, round for replies that held no instruction at all.
                await sample(range(wanted, 2 * wanted - parsed_count))
            order = sorted(survivors, key=lambda instruction: survivors[instruction][:2])
            scores = [(await scoring[instruction])[0] for instruction in order]
        except BaseException as exc:
            await settle(scoring.values(), exc)
            raise
        results = self._remember(order, scores, step, examples)
        for result in results:
            result.details = {"raw": survivors[result.prompt][2][:_RAW_DETAIL_CHARS], "exemplars": picks}
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        message = f"{parsed_count} proposals, {len(order)} new" + (f"; dropped {dropped}" if dropped else "")
        return StepReport(step, results, message=message)
