"""The LLM port: what an optimizer or the evaluator may ask of a language model.

Requests are plain frozen dataclasses so they can be hashed into cache keys. Backends take lists
of requests so each one can batch (the local runner) or fan out under a concurrency limit (HTTP).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable


class Capability(enum.StrEnum):
    GENERATE = "generate"
    LABEL_LOGPROBS = "label_logprobs"
    INPUT_EMBEDDINGS = "input_embeddings"
    DEEP_PROMPT = "deep_prompt"
    TOKEN_EMBEDDINGS = "token_embeddings"
    # A fixed-size vector per text from the model itself (local: a hidden state; HTTP: /v1/embeddings).
    FEATURES = "features"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One chat-style generation: `prompt` is the user message, rendered by the backend's chat template."""

    prompt: str
    max_tokens: int = 256
    temperature: float = 0.0
    n: int = 1
    # A seed makes a sampled request reproducible, and therefore cacheable.
    seed: int | None = None
    stop: tuple[str, ...] = ()
    system: str | None = None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0.0 or self.seed is not None

    def cache_payload(self) -> dict:
        return asdict(self)


class PrefixKind(enum.StrEnum):
    # (n, hidden) vectors put in front of the prompt's token embeddings (BBT, "prepend" form).
    INPUT = "input"
    # (layers, 2, kv_heads, n, head_dim) keys and values in front of every layer's attention (BBTv2, "prepend").
    DEEP = "deep"
    # (n, hidden) vectors ADDED to the input embeddings of the prompt's placeholder tokens (BBT, "add" form):
    # row j to the j-th token of the `anchor` text in the prompt (see `placeholder_span`). All zeros = the text.
    INPUT_ADD = "input_add"
    # (layers, n, hidden) vectors added to the hidden states of the placeholder tokens before every decoder
    # layer (BBTv2, "add" form). All zeros = the text prompt.
    DEEP_ADD = "deep_add"

    @property
    def additive(self) -> bool:
        return self in (PrefixKind.INPUT_ADD, PrefixKind.DEEP_ADD)


@dataclass(frozen=True, slots=True, eq=False)
class ContinuousPrefix:
    """Continuous prompt vectors a white-box backend puts in front of a prompt or adds to its placeholder tokens.

    Identified (for equality and cache keys) by `digest`, a hash of the kind, shape, float32 bytes and anchor, so
    thousands of requests can share one array without it ever being serialised. `anchor` (additive kinds only)
    is the text whose tokens in the prompt are the placeholders."""

    kind: PrefixKind
    vectors: Any  # numpy float32 array, shape per `kind`
    digest: str
    anchor: str | None = None

    @classmethod
    def of(cls, kind: PrefixKind, vectors: Any, anchor: str | None = None) -> ContinuousPrefix:
        import numpy as np

        kind = PrefixKind(kind)
        if kind.additive != (anchor is not None) or anchor == "":
            raise ValueError(f"a {kind.value} prefix needs {'an' if kind.additive else 'no'} anchor text")
        array = np.ascontiguousarray(vectors, dtype=np.float32)
        array.setflags(write=False)
        head = f"{kind.value}:{array.shape}".encode()
        tail = b"" if anchor is None else b"anchor:" + anchor.encode()
        digest = hashlib.sha256(head + array.tobytes() + tail).hexdigest()
        return cls(kind, array, digest, anchor)

    @property
    def length(self) -> int:
        """Virtual tokens the prefix adds (none for the additive kinds: they change existing tokens)."""
        if self.kind.additive:
            return 0
        return int(self.vectors.shape[0] if self.kind == PrefixKind.INPUT else self.vectors.shape[3])

    @property
    def rows(self) -> int:
        """Placeholder vectors per layer of an additive prefix."""
        return int(self.vectors.shape[0] if self.kind == PrefixKind.INPUT_ADD else self.vectors.shape[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ContinuousPrefix) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)


def leading_special_ids(with_special: list[int], plain: list[int]) -> list[int]:
    """The ids a tokenizer puts before every prompt (a BOS for some models, none for SmolLM2), from one text
    tokenized with and without special tokens."""
    cut = len(with_special) - len(plain)
    return with_special[:cut] if cut > 0 and with_special[cut:] == plain else []


def soft_prompt_position(ids: list[int], special: list[int]) -> int:
    """Where an input-layer soft prompt goes in a prompt's ids: after its leading special ids. Both backends
    place it there, so an artifact means the same on the local runner and on vLLM."""
    return len(special) if ids[: len(special)] == special else 0


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def anchor_bounds(prompt: str, anchor: str) -> tuple[int, int]:
    """Character span of the first occurrence of `anchor` in `prompt` (the template's {prompt} slot)."""
    start = prompt.find(anchor)
    if start < 0:
        raise BackendError("the soft prompt's placeholder text does not occur in the prompt")
    return start, start + len(anchor)


def placeholder_span(ids: list[int], ids_before: list[int], ids_through: list[int], rows: int) -> tuple[int, int]:
    """Token positions [start, end) of an additive soft prompt's placeholders in a prompt's `ids`: the tokens of
    its anchor text, found from the ids of the prompt's text before the anchor (`ids_before`) and through its
    end (`ids_through`), all tokenized as prompts (special tokens included); at most `rows` of them. Only a
    tokenizer is needed, so the local runner and an HTTP server place the vectors identically."""
    start = common_prefix_length(ids, ids_before)
    end = min(common_prefix_length(ids, ids_through), start + rows)
    if end <= start:
        raise BackendError("the soft prompt's placeholder text has no tokens of its own in the prompt")
    return start, end


@dataclass(frozen=True, slots=True)
class LabelScoreRequest:
    """Log-prob of the first token of each verbalizer text right after a raw (un-templated) prompt,
    optionally behind a continuous prefix (needs `input_embeddings` or `deep_prompt`)."""

    prompt: str
    verbalizers: tuple[str, ...]
    prefix: ContinuousPrefix | None = None

    @property
    def deterministic(self) -> bool:
        return True

    def cache_payload(self) -> dict:
        payload = {"prompt": self.prompt, "verbalizers": list(self.verbalizers)}
        if self.prefix is not None:
            payload["prefix"] = self.prefix.digest  # absent for plain requests: their keys stay as they were
        return payload


# How a white-box backend turns a text's last-layer hidden states into one vector: their mean over the text's
# tokens, or the state at its last token (the one the next-token logits are read from). An HTTP server pools as it
# was started to (vLLM's pooler config, llama.cpp's --pooling): it is not told.
FEATURE_POOLINGS = ("mean", "last")


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """The model's representation of a raw (un-templated) text, for methods that train on top of it (needs
    `features`)."""

    text: str
    pooling: str = "last"

    @property
    def deterministic(self) -> bool:
        return True

    def cache_payload(self) -> dict:
        return {"text": self.text, "pooling": self.pooling}


@dataclass(slots=True)
class Features:
    """A feature vector, float32 little-endian bytes in base64 (compact in the evaluation cache); see `of` and
    `array`."""

    vector: str
    dim: int
    prompt_tokens: int
    completion_tokens: int = 0

    @classmethod
    def of(cls, values: Any, prompt_tokens: int) -> Features:
        import base64

        import numpy as np

        array = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        return cls(base64.b64encode(array.tobytes()).decode("ascii"), int(array.shape[0]), int(prompt_tokens))

    def array(self) -> Any:
        """The vector as a float32 numpy array of shape (dim,)."""
        import base64

        import numpy as np

        array = np.frombuffer(base64.b64decode(self.vector), dtype="<f4")
        if array.shape[0] != self.dim:
            raise BackendError(f"a feature vector of {array.shape[0]} values claims {self.dim}")
        return array.astype(np.float32)


@dataclass(slots=True)
class Generation:
    texts: list[str]
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class LabelScores:
    # One log-prob per verbalizer, in request order; -inf where the backend could not see the token.
    logprobs: list[float]
    prompt_tokens: int
    completion_tokens: int = 0


@dataclass(slots=True)
class BackendInfo:
    name: str
    kind: str
    model_id: str
    capabilities: frozenset[Capability] = field(default_factory=frozenset)
    max_concurrency: int = 1
    detail: dict = field(default_factory=dict)
    # Shapes of the model behind a white-box backend (continuous prompts): hidden_size, num_layers,
    # num_kv_heads, head_dim, max_positions. Empty for a text-only backend.
    geometry: dict = field(default_factory=dict)


OnResult = Callable[[int, "Generation | LabelScores | Features"], None]


class BackendError(RuntimeError):
    """The backend failed after its retries. `transient` errors (unreachable, 5xx, 429) make the job wait for the
    backend and retry; the others fail the job with this message."""

    transient = False


class BackendUnavailable(BackendError):
    """The backend did not answer, or answered 5xx/429/408, after the per-request retries."""

    transient = True


class SendRefused(Exception):
    """Raised by a send gate: this request may not leave now (the job's lease is not known to be valid)."""


# Checked by HTTP backends right before each request leaves (set per job task by `MeteredLLM`, inherited by the
# backend's fan-out tasks): raises `SendRefused` when the job may no longer call the model. A batch's later
# requests are therefore stopped too, not only the batch as a whole.
SEND_GATE: ContextVar[Callable[[], None] | None] = ContextVar("promptopt_send_gate", default=None)


class CapabilityMissing(BackendError):
    pass


@runtime_checkable
class LLMBackend(Protocol):
    """A model behind one of the capabilities above. Implementations: `local`, `openai_compat`."""

    name: str

    @property
    def info(self) -> BackendInfo: ...

    async def start(self) -> None:
        """Probe capabilities / prepare; cheap to call twice."""

    async def aclose(self) -> None: ...

    def count_tokens_upper_bound(self, text: str) -> int:
        """An upper bound of the prompt tokens `text` costs, used to reserve token budgets before a call."""

    # `on_result(i, result)` is called as soon as request i is answered (before the whole list is),
    # so a worker killed mid-batch has already stored every answer it received.
    async def generate(
        self, requests: list[GenerationRequest], on_result: OnResult | None = None
    ) -> list[Generation]: ...

    async def label_logprobs(
        self, requests: list[LabelScoreRequest], on_result: OnResult | None = None
    ) -> list[LabelScores]: ...
