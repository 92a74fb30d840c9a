"""Phrase-level edits shared by all six Plum searches (docs/methods/plum.md).

A candidate is a list of phrases plus its *delete tracker* (phrases removed from it earlier, which the `add`
edit may re-insert). Phrases come from a light chunker instead of a constituency parser: split after
punctuation and before conjunctions/prepositions. Paraphrases come from the optimizer LLM instead of PEGASUS;
every paraphrase request carries a seed derived from the job seed and the edit's position in the run, so a
replayed step sends identical (cacheable) requests.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.optimizers.base import derived_rng, derived_seed

EditOp = Literal["delete", "swap", "paraphrase", "add"]
ALL_OPS: tuple[EditOp, ...] = ("delete", "swap", "paraphrase", "add")

# Purpose tags of the edit random streams.
_SEED_EDIT = 101
_SEED_PARAPHRASE = 102

# A phrase starts before one of these words (unless the word before is one of them too).
BOUNDARY_WORDS = frozenset(
    """and or but nor so yet because although though while whereas if unless when whenever where whether that
    which who whom whose than then of in on at to for from with without by about into onto over under between
    among through during before after as per via""".split()
)
_PUNCT_END = re.compile(r"[,;:.!?]+[\"')\]]*$")

# Paraphrase function: [(phrase, seed)] -> paraphrases, one per request, same order.
Paraphraser = Callable[[list[tuple[str, int]]], Awaitable[list[str]]]


def _bare(word: str) -> str:
    return word.strip("\"'()[]{}.,;:!?").lower()


def chunk(text: str) -> list[str]:
    """Split an instruction into disjoint phrases; `join(chunk(t))` is `t` with whitespace normalised."""
    phrases: list[list[str]] = []
    current: list[str] = []
    previous_boundary = False
    for word in text.split():
        is_boundary = _bare(word) in BOUNDARY_WORDS
        if current and is_boundary and not previous_boundary:
            phrases.append(current)
            current = []
        current.append(word)
        previous_boundary = is_boundary
        if _PUNCT_END.search(word):
            phrases.append(current)
            current = []
            previous_boundary = False
    if current:
        phrases.append(current)
    return [" ".join(p) for p in phrases]


def join(phrases: Sequence[str]) -> str:
    return " ".join(p.strip() for p in phrases if p and p.strip())


def is_valid(text: str) -> bool:
    """Plum rejects (and regenerates) empty or non-alphabetic instructions."""
    return bool(text.strip()) and any(ch.isalpha() for ch in text)


@dataclass(slots=True)
class Cand:
    """A candidate instruction: its phrases and its delete tracker."""

    phrases: list[str]
    deleted: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return join(self.phrases)

    @classmethod
    def from_text(cls, text: str) -> Cand:
        return cls(chunk(text), [])

    def to_json(self) -> dict[str, Any]:
        return {"phrases": list(self.phrases), "deleted": list(self.deleted)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cand:
        return cls(list(data["phrases"]), list(data["deleted"]))

    def copy(self) -> Cand:
        return Cand(list(self.phrases), list(self.deleted))


@dataclass(slots=True)
class Draft:
    """A candidate being edited. Paraphrases are planned first and filled in by one batched LLM call."""

    cand: Cand
    ops: list[str] = field(default_factory=list)
    pending: list[tuple[int, str, int]] = field(default_factory=list)  # (phrase index, phrase, request seed)
    failed: bool = False


def feasible_ops(cand: Cand, allowed: Sequence[str]) -> list[str]:
    ops = []
    for op in allowed:
        if op in ("delete", "swap") and len(cand.phrases) < 2:
            continue
        if op == "paraphrase" and not cand.phrases:
            continue
        if op == "add" and not cand.deleted:
            continue
        ops.append(op)
    return ops


def op_delete(cand: Cand, rng: np.random.Generator) -> None:
    index = int(rng.integers(len(cand.phrases)))
    cand.deleted.append(cand.phrases.pop(index))


def op_swap(cand: Cand, rng: np.random.Generator) -> None:
    i, j = (int(x) for x in rng.choice(len(cand.phrases), size=2, replace=False))
    cand.phrases[i], cand.phrases[j] = cand.phrases[j], cand.phrases[i]


def op_add(cand: Cand, rng: np.random.Generator) -> None:
    """Re-insert a previously deleted phrase after a random phrase (or at the start)."""
    phrase = cand.deleted.pop(int(rng.integers(len(cand.deleted))))
    position = int(rng.integers(len(cand.phrases) + 1))  # 0: at the start, k: after phrase k-1
    cand.phrases.insert(position, phrase)


def apply_op(draft: Draft, op: str, rng: np.random.Generator, seed: int) -> None:
    """Apply one edit to `draft` in place (a paraphrase only records its request)."""
    cand = draft.cand
    draft.ops.append(op)
    if op == "delete":
        op_delete(cand, rng)
    elif op == "swap":
        op_swap(cand, rng)
    elif op == "add":
        op_add(cand, rng)
    elif op == "paraphrase":
        index = int(rng.integers(len(cand.phrases)))
        draft.pending.append((index, cand.phrases[index], seed))
    else:
        raise ValueError(f"unknown edit {op!r}")


_PREFIX = re.compile(r"^\s*(?:paraphrase|rewritten phrase|phrase|answer|output)\s*:\s*", re.IGNORECASE)
_QUOTES = "\"'`\u201c\u201d\u2018\u2019"


def clean_paraphrase(text: str) -> str:
    """The first non-empty line of a reply, without quotes or a 'Paraphrase:' prefix."""
    for line in (text or "").splitlines():
        line = _PREFIX.sub("", line.replace("**", "")).strip().strip(_QUOTES).strip()
        if line:
            return line
    return ""


def paraphrase_prompt(phrase: str) -> str:
    return (
        "Paraphrase the following phrase from an instruction, keeping its meaning. "
        "Reply with the paraphrase only, on one line.\n"
        f"Phrase: {phrase}\nParaphrase:"
    )


class Editor:
    """Edits candidates: `num_compose` chained edits per child, invalid children regenerated up to
    `max_retries` times. All randomness is derived from (seed, key, attempt, compose round)."""

    def __init__(
        self,
        seed: int,
        paraphraser: Paraphraser,
        ops: Sequence[str] = ALL_OPS,
        num_compose: int = 1,
        max_retries: int = 5,
    ) -> None:
        self.seed = seed
        self.paraphraser = paraphraser
        self.ops = list(ops)
        self.num_compose = num_compose
        self.max_retries = max_retries
        self.paraphrase_calls = 0

    def rng(self, key: Sequence[int], attempt: int, round_: int) -> np.random.Generator:
        return derived_rng(self.seed, _SEED_EDIT, *key, attempt, round_)

    def request_seed(self, key: Sequence[int], attempt: int, round_: int) -> int:
        return derived_seed(self.seed, _SEED_PARAPHRASE, *key, attempt, round_)

    def edit(
        self, draft: Draft, key: Sequence[int], attempt: int, round_: int, ops: Sequence[str] | None = None
    ) -> None:
        """One random feasible edit (from `ops`, default the editor's) applied to `draft`."""
        rng = self.rng(key, attempt, round_)
        choices = feasible_ops(draft.cand, self.ops if ops is None else ops)
        if not choices:
            return
        op = choices[int(rng.integers(len(choices)))]
        apply_op(draft, op, rng, self.request_seed(key, attempt, round_))

    async def resolve(self, drafts: Sequence[Draft]) -> None:
        """Fill in every pending paraphrase with one batched LLM call; a useless reply fails its draft."""
        jobs = [(draft, index, phrase, seed) for draft in drafts for index, phrase, seed in draft.pending]
        if not jobs:
            return
        self.paraphrase_calls += 1
        replies = await self.paraphraser([(phrase, seed) for _, _, phrase, seed in jobs])
        for (draft, index, _, _), reply in zip(jobs, replies, strict=True):
            text = clean_paraphrase(reply)
            if is_valid(text):
                draft.cand.phrases[index] = text
            else:
                draft.failed = True
        for draft in drafts:
            draft.pending.clear()

    async def mutate(self, parents: Sequence[Cand], keys: Sequence[Sequence[int]]) -> list[tuple[Cand, list[str]]]:
        """One edited child per (parent, key): (child, ops applied), or dropped after `max_retries` failed
        regenerations. Order follows `parents`."""
        results: list[tuple[Cand, list[str]] | None] = [None] * len(parents)
        todo = list(range(len(parents)))
        for attempt in range(self.max_retries + 1):
            if not todo:
                break
            drafts = {j: Draft(parents[j].copy()) for j in todo}
            for round_ in range(self.num_compose):
                for j in todo:
                    self.edit(drafts[j], keys[j], attempt, round_)
                await self.resolve([drafts[j] for j in todo])
            retry = []
            for j in todo:
                draft = drafts[j]
                if draft.failed or not draft.ops or not is_valid(draft.cand.text):
                    retry.append(j)
                else:
                    results[j] = (draft.cand, draft.ops)
            todo = retry
        return [r for r in results if r is not None]


def llm_paraphraser(llm: Any, max_tokens: int, temperature: float) -> Paraphraser:
    """A paraphraser backed by a (metered) LLM's `generate`: one seeded request per phrase, one batch."""
    from app.llm.port import GenerationRequest

    async def paraphrase(requests: list[tuple[str, int]]) -> list[str]:
        generations = await llm.generate(
            [
                GenerationRequest(paraphrase_prompt(phrase), max_tokens=max_tokens, temperature=temperature, seed=seed)
                for phrase, seed in requests
            ]
        )
        return [g.texts[0] if g.texts else "" for g in generations]

    return paraphrase
