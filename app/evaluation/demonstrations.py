"""Demonstrations: training examples shown inside a prompt (in-context learning), and prompts made of an instruction
plus demonstrations.

A prompt with demonstrations is an instruction and an ordered list of train examples, each rendered as a
*demonstration*: by the task's `demo_template` (a text with {input} and {target} slots) when it has one, else as the
model sees a query - the task template with an empty {prompt} slot, stripped - followed by the answer exactly as it
is scored (a label task: the label's first verbalizer text, e.g. " Sports"; other tasks: a space and the target).
The input is cut to `task.demo_max_chars` characters first. The rendered text fills the template's {prompt} slot like
any instruction, so scoring, caching and `predict` see plain text.

Layout (`compose`): the demonstrations and the instruction separated by blank lines, demonstrations first by default.
The text every prompt of a search shares then comes first: when the instruction is what varies (OPRO, APO or Plum
carrying one demonstration set) every candidate starts with the same long demonstration block, which a server with
automatic prefix caching (vLLM) computes once; `instruction_first` is the classic layout (BBT-RGB's). The local CPU
runner re-uses no prefix between requests (every request is a full forward pass), so there the layout changes
accuracy, not cost.

No leakage: demonstrations come from the train split only, and an example scored with a prompt never sees itself
among the demonstrations (`FixedDemonstrations` and `NearestDemonstrations` leave out every demonstration equal to
the example being scored). Dev and test examples are never drawn.

Per-input demonstrations (`NearestDemonstrations`, as KNN few-shot prompting does): the k train examples whose
inputs are most similar to the input by sentence embedding (all-MiniLM-L6-v2, cosine), the most similar last, next
to the query. Such a prompt is not one text: it is a `PerExamplePrompt` the evaluator resolves per example, and its
artifact (`to_artifact`) carries everything that rebuilds it - the instruction, k, and the retrieval pool's inputs and
rendered demonstrations - so dev, test and `predict` resolve exactly what the search scored.

Everything here is deterministic: draws come from generators seeded by (seed, purpose), similarities are rounded
before they are ranked (so a text embedded in another batch, whose last float bits may differ, ranks the same) and
ties go to the lower train position.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.evaluation.evaluator import PerExamplePrompt
from app.evaluation.task import Example, Task
from app.evaluation.templates import render

DEFAULT_MAX_CHARS = 150
INPUT_SLOT = "{input}"
TARGET_SLOT = "{target}"
LAYOUTS = ("demonstrations_first", "instruction_first")
SEPARATOR = "\n\n"

# Purpose of the stratified draw's generator (BBT-RGB's initialisation has drawn with it since it was added).
_DRAW_PURPOSE = 421
# Inputs are embedded up to this many characters (MiniLM reads at most 512 word pieces).
EMBED_CHARS = 400
# Similarities are rounded to this many decimals before ranking.
_SIMILARITY_DECIMALS = 5
ARTIFACT_KIND = "nearest_demonstrations"
ARTIFACT_VERSION = 1


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) % (2**63), *keys])))


# ----------------------------------------------------------------------------------------------------------
# Drawing


def pick_demonstrations(targets: Sequence[str], labels: Sequence[str] | None, count: int, seed: int) -> list[int]:
    """Positions (into `targets`, the train split's) of `count` demonstrations, in the order they are shown; fewer
    when the split has fewer examples. With `labels` the draw is stratified: labels are taken in turn, in a seeded
    order, each turn adding one seeded random example of that label not drawn before, so `count` = k x |labels| gives
    k per class. Without labels (a generation task) it is a seeded uniform draw. The drawn examples are shown in a
    seeded order."""
    rng = _rng(seed, _DRAW_PURPOSE)
    strata = list(labels) if labels else [None]
    pools = {label: [i for i, t in enumerate(targets) if label is None or t == label] for label in strata}
    for label in strata:
        rng.shuffle(pools[label])
    order = [strata[i] for i in rng.permutation(len(strata))]
    picked: list[int] = []
    while len(picked) < count and any(pools.values()):
        for label in order:
            if pools[label] and len(picked) < count:
                picked.append(pools[label].pop())
    return [picked[i] for i in rng.permutation(len(picked))]


def reorder(positions: Sequence[int], seed: int, *keys: int) -> list[int]:
    """A seeded permutation of `positions` (another order of the same demonstrations)."""
    return [int(positions[i]) for i in _rng(seed, _DRAW_PURPOSE, *keys).permutation(len(positions))]


def check_positions(positions: Sequence[int], n_train: int) -> str | None:
    """Why explicit demonstration positions cannot be used on a train split of `n_train` (None: they can)."""
    bad = [p for p in positions if not 0 <= p < n_train]
    if bad:
        return f"demonstration positions {bad[:5]} are outside the train split (positions 0 to {n_train - 1})"
    if len(set(positions)) != len(positions):
        return "demonstration positions repeat"
    return None


# ----------------------------------------------------------------------------------------------------------
# Rendering


def answer_text(task: Task, target: str) -> str:
    """The answer as the model is scored on it: a label's first verbalizer text, else a space and the target."""
    if task.labels and target in task.labels:
        return task.verbalizer_words()[task.labels.index(target)][0]
    return target if target[:1].isspace() else " " + target


def fill_demo_template(template: str, input_text: str, target: str) -> str:
    """`template` with {input} and {target} replaced literally (neither value is scanned again)."""
    parts = re.split(r"(\{input\}|\{target\})", template)
    return "".join(input_text if p == INPUT_SLOT else target if p == TARGET_SLOT else p for p in parts)


def render_demonstration(task: Task, example: Example, max_chars: int | None = None) -> str:
    """One demonstration: the input cut to `max_chars` (default: the task's `demo_max_chars`), by the task's
    `demo_template`, or as a query (empty {prompt} slot) followed by the answer as it is scored."""
    limit = task.demo_max_chars if max_chars is None else max_chars
    cut = example.input[:limit].rstrip()
    answer = answer_text(task, example.target)
    if task.demo_template is not None:
        return fill_demo_template(task.demo_template, cut, answer.strip())
    return render(task.template, "", cut).strip() + answer


def compose(instruction: str, demonstrations: Sequence[str], layout: str = "demonstrations_first") -> str:
    """The {prompt} text: the demonstrations and the instruction, separated by blank lines, in `layout`'s order
    (no demonstrations: the instruction untouched)."""
    if not demonstrations:
        return instruction
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    head = [instruction.strip()] if layout == "instruction_first" else []
    tail = [instruction.strip()] if layout == "demonstrations_first" else []
    return SEPARATOR.join(part for part in [*head, *demonstrations, *tail] if part)


def longest_block(task: Task, count: int, layout: str = "demonstrations_first") -> str:
    """The longest demonstration block `count` demonstrations of the train split can make: for reserving the tokens
    a prompt with demonstrations may cost (its `count` longest renderings)."""
    if count <= 0:
        return ""
    rendered = sorted((render_demonstration(task, ex) for ex in task.split_examples("train")), key=len, reverse=True)
    return compose("", rendered[:count], layout)


# ----------------------------------------------------------------------------------------------------------
# Prompts with demonstrations


@dataclass(frozen=True, slots=True)
class Demonstration:
    """A train example shown in a prompt: its train-split position, the example, its rendering."""

    position: int
    example: Example
    text: str


def demonstrations_of(task: Task, positions: Sequence[int]) -> list[Demonstration]:
    train = task.split_examples("train")
    return [Demonstration(int(p), train[p], render_demonstration(task, train[p])) for p in positions]


class FixedDemonstrations(PerExamplePrompt):
    """An instruction with a fixed, ordered demonstration set. Its text is `text` for every example except one that is
    itself among the demonstrations, which is scored without it (the others keep their order)."""

    def __init__(
        self,
        instruction: str,
        demonstrations: Sequence[Demonstration],
        layout: str = "demonstrations_first",
        description: str | None = None,
    ) -> None:
        self.instruction = instruction
        self.demonstrations = list(demonstrations)
        self.layout = layout
        self.text = compose(instruction, [d.text for d in self.demonstrations], layout)
        # The name scores carry: the text by default; a method that keys its results by instruction names it so.
        self.description = self.text if description is None else description
        self._members = {d.example for d in self.demonstrations}

    @property
    def positions(self) -> list[int]:
        return [d.position for d in self.demonstrations]

    def text_for(self, example: Example) -> str:
        if example not in self._members:
            return self.text
        kept = [d.text for d in self.demonstrations if d.example != example]
        return compose(self.instruction, kept, self.layout)


Embedder = Callable[[list[str]], np.ndarray]


def default_embedder(texts: list[str]) -> np.ndarray:
    from app.llm.sentence_embeddings import embed

    return embed(texts)


def embedding_model_id() -> str:
    from app.llm.sentence_embeddings import MODEL_ID

    return MODEL_ID


def example_digest(example: Example) -> str:
    """What identifies a train example in an artifact without storing it whole (leaving it out as its own
    demonstration)."""
    return hashlib.md5(f"{example.input}\x00{example.target}".encode()).hexdigest()


# Sentence embeddings by (model, text): every nearest-neighbour prompt of a job embeds the same pool and inputs, and
# `predict` and the test scoring rebuild the same pool again and again. The most recently used are kept (16,384
# vectors of 384 floats: 25 MB); an unnamed ("custom") embedder is never cached.
_EMBEDDINGS: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_EMBEDDINGS_SIZE = 16_384
_EMBEDDINGS_LOCK = threading.Lock()


def cached_embeddings(embedder: Embedder, model: str, texts: Sequence[str]) -> np.ndarray:
    """Embeddings of `texts` (rows in order), each text embedded once per process for a named model."""
    if model == "custom":
        return np.asarray(embedder(list(texts)), dtype=np.float32)
    found: dict[str, np.ndarray] = {}
    with _EMBEDDINGS_LOCK:
        for text in texts:
            vector = _EMBEDDINGS.get((model, text))
            if vector is not None:
                _EMBEDDINGS.move_to_end((model, text))
                found[text] = vector
    missing = list(dict.fromkeys(text for text in texts if text not in found))
    if missing:
        vectors = np.asarray(embedder(missing), dtype=np.float32)
        with _EMBEDDINGS_LOCK:
            for text, vector in zip(missing, vectors, strict=True):
                found[text] = _EMBEDDINGS[(model, text)] = vector
            while len(_EMBEDDINGS) > _EMBEDDINGS_SIZE:
                _EMBEDDINGS.popitem(last=False)
    return np.stack([found[text] for text in texts])


class NearestDemonstrations(PerExamplePrompt):
    """Per input, the `k` pool entries whose inputs are most similar to it (cosine of sentence embeddings), the most
    similar last; an entry equal to the example being scored is never among them. `pool`: (train position, example
    digest, text embedded, rendered demonstration)."""

    def __init__(
        self,
        instruction: str,
        pool: Sequence[tuple[int, str, str, str]],
        k: int,
        layout: str = "demonstrations_first",
        description: str | None = None,
        embedder: Embedder | None = None,
        model: str | None = None,
    ) -> None:
        if not pool:
            raise ValueError("nearest-neighbour demonstrations need a non-empty pool")
        self.instruction = instruction
        self.pool = [(int(p), str(d), str(t), str(r)) for p, d, t, r in pool]
        self.k = int(k)
        self.layout = layout
        self.embedder = embedder or default_embedder
        self.model = model if model is not None else (embedding_model_id() if embedder is None else "custom")
        self.description = description if description is not None else self.default_description()
        self._pool_vectors: np.ndarray | None = None
        # input text -> pool indices from the most to the least similar (the first k + a margin for exclusions)
        self._ranked: dict[str, list[int]] = {}

    @classmethod
    def from_task(
        cls,
        task: Task,
        positions: Sequence[int],
        instruction: str,
        k: int,
        layout: str = "demonstrations_first",
        embedder: Embedder | None = None,
    ) -> NearestDemonstrations:
        train = task.split_examples("train")
        pool = [
            (int(p), example_digest(train[p]), train[p].input[:EMBED_CHARS], render_demonstration(task, train[p]))
            for p in positions
        ]
        return cls(instruction, pool, k, layout, embedder=embedder)

    def default_description(self) -> str:
        where = "per input" if self.layout == "demonstrations_first" else "per input, after the instruction"
        note = f"[demonstrations: the {self.k} most similar train examples {where} ({len(self.pool)} in the pool)]"
        return compose(self.instruction, [note], self.layout)

    # -- neighbours -------------------------------------------------------------------------------------------

    def _embed_pool(self) -> np.ndarray:
        if self._pool_vectors is None:
            texts = [text for _, _, text, _ in self.pool]
            self._pool_vectors = cached_embeddings(self.embedder, self.model, texts)
        return self._pool_vectors

    def _rank(self, inputs: list[str], keep: int | None = None) -> None:
        """Rank the pool for each input (the first `keep`, by default k and a margin for left-out copies)."""
        pool = self._embed_pool()
        queries = cached_embeddings(self.embedder, self.model, [text[:EMBED_CHARS] for text in inputs])
        similarity = np.round(queries @ pool.T, _SIMILARITY_DECIMALS)
        keep = min(len(self.pool), self.k + 8 if keep is None else keep)
        for text, row in zip(inputs, similarity, strict=True):
            order = np.lexsort((np.arange(len(self.pool)), -row))  # most similar first; ties: lower pool index
            self._ranked[text] = [int(i) for i in order[:keep]]

    def _ensure(self, inputs: list[str]) -> None:
        fresh = list(dict.fromkeys(text for text in inputs if text not in self._ranked))
        if fresh:
            self._rank(fresh)

    async def prepare(self, examples: list[Example]) -> None:
        inputs = [ex.input for ex in examples]
        if any(text not in self._ranked for text in inputs):
            await asyncio.to_thread(self._ensure, inputs)

    def neighbours(self, example: Example) -> list[int]:
        """Pool indices of the example's demonstrations, in the order shown (the most similar last)."""
        self._ensure([example.input])  # the evaluator prepared it; this is for direct use
        own = example_digest(example)
        ranked = [i for i in self._ranked[example.input] if self.pool[i][1] != own]
        if len(ranked) < self.k and len(self._ranked[example.input]) < len(self.pool):
            self._rank([example.input], keep=len(self.pool))  # many copies of the example: rank the whole pool
            ranked = [i for i in self._ranked[example.input] if self.pool[i][1] != own]
        return list(reversed(ranked[: self.k]))

    def positions_for(self, example: Example) -> list[int]:
        """Train positions of the example's demonstrations, in the order shown."""
        return [self.pool[i][0] for i in self.neighbours(example)]

    def text_for(self, example: Example) -> str:
        return compose(self.instruction, [self.pool[i][3] for i in self.neighbours(example)], self.layout)

    # -- artifact ---------------------------------------------------------------------------------------------

    def to_artifact(self, method: str) -> dict[str, Any]:
        return {
            "version": ARTIFACT_VERSION,
            "method": method,
            "kind": ARTIFACT_KIND,
            "model_id": self.model,
            "instruction": self.instruction,
            "k": self.k,
            "layout": self.layout,
            "description": self.description,
            "pool": [{"position": p, "digest": d, "embedded": t, "text": r} for p, d, t, r in self.pool],
        }

    @classmethod
    def from_artifact(cls, artifact: dict[str, Any], embedder: Embedder | None = None) -> NearestDemonstrations:
        if artifact.get("kind") != ARTIFACT_KIND:
            raise ValueError(f"not a {ARTIFACT_KIND} artifact")
        pool = [(e["position"], e["digest"], e["embedded"], e["text"]) for e in artifact["pool"]]
        return cls(
            artifact["instruction"],
            pool,
            artifact["k"],
            artifact["layout"],
            description=artifact["description"],
            embedder=embedder,
            model=artifact["model_id"] if embedder is None else "custom",
        )
