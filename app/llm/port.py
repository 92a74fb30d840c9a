"""The LLM port: what an optimizer or the evaluator may ask of a language model.

Requests are plain frozen dataclasses so they can be hashed into cache keys. Backends take lists
of requests so each one can batch (the local runner) or fan out under a concurrency limit (HTTP).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


class Capability(enum.StrEnum):
    GENERATE = "generate"
    LABEL_LOGPROBS = "label_logprobs"
    INPUT_EMBEDDINGS = "input_embeddings"
    DEEP_PROMPT = "deep_prompt"
    TOKEN_EMBEDDINGS = "token_embeddings"


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


@dataclass(frozen=True, slots=True)
class LabelScoreRequest:
    """Log-prob of the first token of each verbalizer text right after a raw (un-templated) prompt."""

    prompt: str
    verbalizers: tuple[str, ...]

    @property
    def deterministic(self) -> bool:
        return True


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


OnResult = Callable[[int, "Generation | LabelScores"], None]


class BackendError(RuntimeError):
    """The backend failed after its retries; the job fails with this message."""


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
