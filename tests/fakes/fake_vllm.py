"""A fake vLLM server for tests: the OpenAI-compatible routes the `openai_compat` backend uses, a toy
deterministic "model", a request log, and fault injection.

In a test (the server runs in a background thread of the test process):

    with FakeVLLMServer() as fake:
        settings = BackendSettings(kind="openai_compat", base_url=fake.base_url)
        ...
        assert fake.count("chat") == 3                  # LLM calls seen at the boundary
        fake.hold_after(2)                              # let 2 more LLM calls through, then block
        await fake.wait_held(1)                         # a third one is now blocked
        fake.release()

As a process (other tests' worker subprocesses can point at it; the test drives it over HTTP):

    python -m tests.fakes.fake_vllm --port 8123 [--no-logprob-token-ids] [--max-logprobs 20] [--embeddings]
    # prints "FAKE_VLLM_URL=http://127.0.0.1:8123/v1" once it accepts connections

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings (only with
`supports_embeddings`; otherwise 404 as on a server without it), POST /tokenize, POST /detokenize, and a control API
under /_fake/ (state, log, hold_after, release, fail_next, reset) for the process mode.

The toy model:
  * Tokens: newline, or optional spaces + a run of word characters, or optional spaces + one other
    character (" positive", ":", "\\n"); id = a stable hash of the token string (same in every process).
  * Next-token distribution after a text: a log-softmax over the candidates (a fixed base vocabulary
    plus the prompt's own tokens) of logits drawn from a hash of (text, token). A token outside the
    candidates gets a finite, very low log-prob (about -30). So label scores are deterministic, differ
    from prompt to prompt, and some prompts score the right label higher than others.
  * Chat text: words drawn with a RNG seeded by the rendered messages (temperature 0), or by
    (messages, seed, temperature, sample index) when seeded; unseeded sampling is random.
  * Embeddings: the normalised sum of a fixed pseudo-random vector per (lower-cased) word, `EMBEDDING_DIM` values:
    texts sharing words get similar vectors, so a classifier can learn from them.

The log: every request (not the /_fake/ ones) is appended as a `LoggedRequest` when it arrives;
`completed` turns true only once its 2xx answer is produced, just before the handler returns it. A
failed (injected or invalid) request or a held one is never completed; nor is one whose client went away
while it was held or delayed (answered 499 once released: a killed worker received nothing). Requests carrying
`X-Promptopt-Probe: 1` (the backend's start-up probe) are logged with `probe=True`, left out of
`count()` / `requests()` / `completed_requests()` unless `include_probes=True`, and bypass every
fault knob (latency, delays, failures, the gate).

`kind` filters take a kind ("models", "chat", "completions", "embeddings", "tokenize", "detokenize"), several,
or None, which means the LLM calls: ("chat", "completions", "embeddings").
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import inspect
import math
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from app.llm.openai_compat import PROBE_HEADER

MODELS = "models"
CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"
TOKENIZE = "tokenize"
DETOKENIZE = "detokenize"
LLM_KINDS: tuple[str, ...] = (CHAT, COMPLETIONS, EMBEDDINGS)
ALL_KINDS: tuple[str, ...] = (MODELS, CHAT, COMPLETIONS, EMBEDDINGS, TOKENIZE, DETOKENIZE)

DEFAULT_MODEL = "fake-model"
MAX_MODEL_LEN = 8192

# (kind, body) -> None (default answer) | dict | Response, or an awaitable of one. See FakeVLLM.responder.
Responder = Callable[[str, dict], Any]
KindFilter = str | Iterable[str] | None


# ---------------------------------------------------------------------- the toy model

_TOKEN_RE = re.compile(r"\n|[^\S\n]*\w+|[^\S\n]*[^\w\s]|\s")
BOS_ID = 1
BOS = "<s>"
_FIRST_ID = 1000
_VOCAB_SPAN = 10_000_000
OOV_LOGPROB = -30.0
_MAX_PROMPT_CANDIDATES = 256
EMBEDDING_DIM = 64
_WORD_RE = re.compile(r"\w+")

BASE_VOCAB: tuple[str, ...] = tuple(
    [" the", " a", " is", " it", " and", " of", " to", " in", " not", " I", " answer", " yes", " no"]
    + [" Yes", " No", " true", " false", " True", " False", " positive", " negative", " neutral"]
    + [f" {c}" for c in "ABCDE"]
    + [f" {d}" for d in range(10)]
    + [".", ",", ":", "\n", "!", "?"]
)
CHAT_WORDS: tuple[str, ...] = (
    "think", "step", "by", "carefully", "answer", "the", "question", "read", "text", "classify", "label",
    "sentiment", "review", "explain", "briefly", "concisely", "consider", "each", "option", "choose", "best",
    "correct", "final", "reason", "about", "input", "output", "precisely", "first", "then", "check", "again",
)  # fmt: skip


def _unit(*parts: object) -> float:
    """A stable pseudo-random number in [0, 1) from the parts."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class ToyModel:
    """Deterministic tokenizer + next-token distribution; the same answers in every process."""

    def __init__(self) -> None:
        self._strings: dict[int, str] = {BOS_ID: BOS}

    # tokenizer
    def token_strings(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(text)

    def token_id(self, token: str) -> int:
        digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
        token_id = _FIRST_ID + int.from_bytes(digest, "big") % _VOCAB_SPAN
        self._strings.setdefault(token_id, token)
        return token_id

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.token_id(t) for t in self.token_strings(text)]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._strings.get(i, f"<unk_{i}>") for i in ids)

    def token_string(self, token_id: int) -> str | None:
        return self._strings.get(token_id)

    # language model
    def candidates(self, prompt: str) -> list[str]:
        seen = dict.fromkeys(BASE_VOCAB)
        for token in self.token_strings(prompt):
            if len(seen) >= len(BASE_VOCAB) + _MAX_PROMPT_CANDIDATES:
                break
            seen.setdefault(token)
        for token in seen:
            self.token_id(token)  # so /detokenize knows every token the model can emit
        return list(seen)

    def next_token_logprobs(self, text: str, candidates: Sequence[str] | None = None) -> dict[str, float]:
        """Log-probs of the candidate next tokens after `text` (they sum to 1 in probability)."""
        candidates = self.candidates(text) if candidates is None else candidates
        context = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        logits = {token: 8.0 * _unit(context, token) for token in candidates}
        top = max(logits.values())
        norm = top + math.log(sum(math.exp(v - top) for v in logits.values()))
        return {token: value - norm for token, value in logits.items()}

    def logprob(self, text: str, token: str) -> float:
        """Log-prob of `token` right after `text`: a candidate's, or a very low one outside them."""
        dist = self.next_token_logprobs(text)
        if token in dist:
            return dist[token]
        return OOV_LOGPROB - 5.0 * _unit("oov", text, token)

    def top_k(self, text: str, k: int) -> list[tuple[str, float]]:
        dist = self.next_token_logprobs(text)
        return sorted(dist.items(), key=lambda item: (-item[1], item[0]))[:k]

    def label_logprobs(self, prompt: str, verbalizers: Sequence[str], top_k: int | None = None) -> list[float]:
        """Ground truth of `label_logprobs`: each verbalizer's first token after the raw prompt.

        With `top_k`, what a top-k read sees: -inf for a first token outside the k best.
        """
        visible = dict(self.top_k(prompt, top_k)) if top_k is not None else None
        out = []
        for verbalizer in verbalizers:
            tokens = self.token_strings(verbalizer)
            if not tokens:
                out.append(-math.inf)
            elif visible is not None:
                out.append(visible.get(tokens[0], -math.inf))
            else:
                out.append(self.logprob(prompt, tokens[0]))
        return out

    def embedding(self, text: str) -> list[float]:
        """A deterministic bag-of-words vector of unit length (all zeros but the first for a text without words)."""
        total = [0.0] * EMBEDDING_DIM
        for word in _WORD_RE.findall(text.lower()):
            for d in range(EMBEDDING_DIM):
                total[d] += _unit("embedding", word, d) - 0.5
        norm = math.sqrt(sum(v * v for v in total))
        if norm == 0.0:
            return [1.0] + [0.0] * (EMBEDDING_DIM - 1)
        return [v / norm for v in total]

    def render_chat(self, messages: Sequence[dict]) -> str:
        parts = [f"<|{m.get('role', 'user')}|>\n{_content_text(m.get('content'))}\n" for m in messages]
        return "".join(parts) + "<|assistant|>\n"

    def chat_text(self, rendered: str, *, temperature: float, seed: int | None, index: int) -> str:
        if temperature == 0:
            rng = random.Random(f"greedy|{rendered}")
        elif seed is not None:
            rng = random.Random(f"sampled|{rendered}|{seed}|{temperature}|{index}")
        else:
            rng = random.Random()
        words = [rng.choice(CHAT_WORDS) for _ in range(rng.randint(3, 12))]
        return " ".join(words).capitalize() + "."


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return "" if content is None else str(content)


# ---------------------------------------------------------------------- the log


@dataclass
class LoggedRequest:
    index: int
    kind: str
    body: dict
    probe: bool = False
    # True once the answer was produced (2xx), just before the handler returned it.
    completed: bool = False
    # True if the request waited at the gate (`hold_after`).
    held: bool = False
    status: int | None = None
    response: dict | None = None
    started_at: float = 0.0
    finished_at: float | None = None

    @property
    def prompts(self) -> int:
        """LLM calls this request carries: the length of a completions prompt list, else 1."""
        if self.kind == EMBEDDINGS:
            texts = self.body.get("input")
            return len(texts) if isinstance(texts, list) and texts else 1
        prompt = self.body.get("prompt_embeds", self.body.get("prompt"))
        return len(prompt) if self.kind == COMPLETIONS and isinstance(prompt, list) and prompt else 1


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    entry: LoggedRequest


def _kinds(kind: KindFilter) -> frozenset[str]:
    if kind is None:
        return frozenset(LLM_KINDS)
    if isinstance(kind, str):
        return frozenset({kind})
    return frozenset(kind)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError"}.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class FakeVLLM:
    """The fake's state and ASGI app (`.app`); thread-safe, so a test can drive it from any thread."""

    def __init__(
        self,
        *,
        model: str = DEFAULT_MODEL,
        supports_logprob_token_ids: bool = True,
        ignore_unknown_fields: bool = False,
        supports_tokenize: bool = True,
        max_logprobs: int = 20,
        supports_prompt_lists: bool = True,
        supports_embeddings: bool = False,
        latency_s: float = 0.0,
        responder: Responder | None = None,
    ) -> None:
        self.model = model
        self.supports_logprob_token_ids = supports_logprob_token_ids
        # vLLM before `logprob_token_ids` ignored unknown fields; False answers 400 like a strict server.
        self.ignore_unknown_fields = ignore_unknown_fields
        self.supports_tokenize = supports_tokenize
        self.max_logprobs = max_logprobs
        # vLLM and OpenAI take a list of prompts in one completions request; some servers take only one.
        self.supports_prompt_lists = supports_prompt_lists
        # vLLM serves /v1/embeddings only for a pooling model; False answers 404 like a server without the route.
        self.supports_embeddings = supports_embeddings
        # (running, waiting) served at /metrics as vLLM's gauges; None: no /metrics (404).
        self.queue_gauges: tuple[float, float] | None = None
        self.metrics_reads = 0
        # Sleep before answering each non-probe LLM call.
        self.latency_s = latency_s
        # Overrides answers: `responder(kind, body)` (sync or async), called after the fault knobs and for
        # probe requests too (so a scripted server is probed as what it pretends to be).
        #   None                 -> the toy model's answer
        #   a starlette Response -> sent as is (completed iff 2xx)
        #   a dict with "choices", or any dict for a non-LLM kind -> sent as JSON, verbatim
        #   chat shortcut:        {"text": str} or {"texts": [str, ...]} -> a normal chat answer with usage
        #   completions shortcut: {"token_logprobs": {token string: logprob}} -> replaces the toy
        #                         model's next-token distribution for the first generated position
        self.responder = responder
        self._initial_knobs = (latency_s, responder)
        self.toy = ToyModel()

        self._lock = threading.Lock()
        self._log: list[LoggedRequest] = []
        self._failures: list[tuple[frozenset[str], int, float | None]] = []
        # (probability, random source): each LLM call fails with 500 with this probability.
        self._failure_rate: tuple[float, random.Random] | None = None
        self._delays: list[tuple[frozenset[str], float]] = []
        self._gate_kinds: frozenset[str] | None = None  # None: gate open
        self._gate_left = 0
        self._waiters: list[_Waiter] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._closing = False
        self.app = self._build_app()

    # ------------------------------------------------------------------ inspection

    def requests(self, kind: KindFilter = None, *, include_probes: bool = False) -> list[LoggedRequest]:
        """Snapshots of the logged requests of `kind`, in arrival order."""
        kinds = _kinds(kind)
        with self._lock:
            return [dataclasses.replace(e) for e in self._log if e.kind in kinds and (include_probes or not e.probe)]

    def completed_requests(self, kind: KindFilter = None, *, include_probes: bool = False) -> list[LoggedRequest]:
        return [e for e in self.requests(kind, include_probes=include_probes) if e.completed]

    def count(self, kind: KindFilter = None, *, completed_only: bool = False, include_probes: bool = False) -> int:
        """LLM calls seen: one per prompt (a completions request with a prompt list counts each prompt)."""
        entries = self.requests(kind, include_probes=include_probes)
        return sum(e.prompts for e in entries if e.completed or not completed_only)

    @property
    def in_flight(self) -> int:
        """Non-probe LLM calls being handled now (held ones included)."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """Most non-probe LLM calls handled at once since the start or the last `reset()`."""
        with self._lock:
            return self._max_in_flight

    def held_count(self) -> int:
        """Requests blocked at the gate right now."""
        with self._lock:
            return len(self._waiters)

    async def wait_held(self, n: int = 1, *, wait_s: float = 10.0) -> None:
        """Wait (without blocking the caller's event loop) until at least `n` requests are held."""
        deadline = time.monotonic() + wait_s
        while self.held_count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.held_count()} request(s) held after {wait_s}s, wanted {n}")
            await asyncio.sleep(0.01)

    def wait_held_sync(self, n: int = 1, *, wait_s: float = 10.0) -> None:
        """`wait_held` for a thread that runs no event loop (never call it on the loop the client uses)."""
        deadline = time.monotonic() + wait_s
        while self.held_count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.held_count()} request(s) held after {wait_s}s, wanted {n}")
            time.sleep(0.01)

    def expected_label_logprobs(
        self, prompt: str, verbalizers: Sequence[str], *, top_k: int | None = None
    ) -> list[float]:
        """What the default answers imply for `label_logprobs` (see `ToyModel.label_logprobs`)."""
        return self.toy.label_logprobs(prompt, verbalizers, top_k)

    # ------------------------------------------------------------------ fault injection

    def fail_next(self, n: int = 1, status: int = 500, *, retry_after: float | None = None, kinds: KindFilter = None):
        """Answer the next `n` requests of `kinds` (default: LLM calls) with `status`."""
        with self._lock:
            self._failures.extend([(_kinds(kinds), status, retry_after)] * n)

    def fail_randomly(self, rate: float, *, seed: int = 0) -> None:
        """From now on each LLM call answers 500 with probability `rate` (seeded; 0 turns it off)."""
        with self._lock:
            self._failure_rate = (rate, random.Random(seed)) if rate > 0 else None

    def delay_next(self, n: int, seconds: float, *, kinds: KindFilter = None) -> None:
        """Sleep `seconds` before answering each of the next `n` requests of `kinds` (on top of latency_s)."""
        with self._lock:
            self._delays.extend([(_kinds(kinds), seconds)] * n)

    def hold_after(self, n: int, *, kinds: KindFilter = None) -> None:
        """Let `n` more LLM calls of `kinds` (default: LLM calls) through; every later request blocks until
        `release()`. A request carrying a prompt list counts each prompt, and passes whole while any are left.

        Counted when a request passes the gate, not when it completes, so with many requests at once
        about `n` get answered and the rest are held.
        """
        with self._lock:
            self._gate_kinds = _kinds(kinds)
            self._gate_left = n

    def release(self) -> None:
        """Open the gate: every held request goes on, and later ones are not held."""
        with self._lock:
            self._gate_kinds = None
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            try:
                waiter.loop.call_soon_threadsafe(waiter.event.set)
            except RuntimeError:  # that loop is closed: the server is gone
                pass

    def reset(self) -> None:
        """Forget the log and the fault knobs (held requests are released first); `latency_s` and
        `responder` go back to what the constructor was given, so a shared server starts each test clean."""
        self.release()
        with self._lock:
            self._log.clear()
            self._failures.clear()
            self._failure_rate = None
            self._delays.clear()
            self._max_in_flight = self._in_flight
        self.latency_s, self.responder = self._initial_knobs
        self.queue_gauges, self.metrics_reads = None, 0

    # ------------------------------------------------------------------ request handling

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake vLLM")

        @app.get("/metrics")
        async def metrics() -> Response:
            # vLLM's Prometheus gauges of its queue, when a test sets `queue_gauges = (running, waiting)`.
            if self.queue_gauges is None:
                return _error(404, "Not Found")
            running, waiting = self.queue_gauges
            lines = [
                "# TYPE vllm:num_requests_running gauge",
                f'vllm:num_requests_running{{model_name="{self.model}"}} {running}',
                "# TYPE vllm:num_requests_waiting gauge",
                f'vllm:num_requests_waiting{{model_name="{self.model}"}} {waiting}',
            ]
            self.metrics_reads += 1
            return Response("\n".join(lines) + "\n", media_type="text/plain")

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            return await self._handle(MODELS, request)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(CHAT, request)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._handle(COMPLETIONS, request)

        @app.post("/v1/embeddings")
        async def embeddings(request: Request) -> Response:
            return await self._handle(EMBEDDINGS, request)

        @app.post("/tokenize")
        async def tokenize(request: Request) -> Response:
            return await self._handle(TOKENIZE, request)

        @app.post("/detokenize")
        async def detokenize(request: Request) -> Response:
            return await self._handle(DETOKENIZE, request)

        @app.get("/_fake/state")
        async def state() -> dict:
            return {
                "held": self.held_count(),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "counts": {k: self.count(k) for k in ALL_KINDS},
                "completed": {k: self.count(k, completed_only=True) for k in ALL_KINDS},
            }

        @app.get("/_fake/log")
        async def log(include_probes: bool = False) -> list[dict]:
            return [dataclasses.asdict(e) for e in self.requests(ALL_KINDS, include_probes=include_probes)]

        @app.post("/_fake/hold_after")
        async def hold_after(body: dict) -> dict:
            self.hold_after(int(body["n"]), kinds=body.get("kinds"))
            return {"ok": True}

        @app.post("/_fake/release")
        async def release() -> dict:
            self.release()
            return {"ok": True}

        @app.post("/_fake/fail_next")
        async def fail_next(body: dict) -> dict:
            self.fail_next(int(body.get("n", 1)), int(body.get("status", 500)), kinds=body.get("kinds"))
            return {"ok": True}

        @app.post("/_fake/reset")
        async def reset() -> dict:
            self.reset()
            return {"ok": True}

        return app

    async def _handle(self, kind: str, request: Request) -> Response:
        body: dict = {}
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                body = {}
            if not isinstance(body, dict):
                body = {"_raw": body}
        probe = request.headers.get(PROBE_HEADER) == "1"
        with self._lock:
            entry = LoggedRequest(len(self._log), kind, body, probe=probe, started_at=time.monotonic())
            self._log.append(entry)
            tracked = not probe and kind in LLM_KINDS
            if tracked:
                self._in_flight += 1
                self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            response = await self._respond(kind, body, entry, request)
            with self._lock:
                entry.status = response.status_code
                entry.finished_at = time.monotonic()
                # Completed just before the handler returns its (already rendered) answer.
                entry.completed = 200 <= response.status_code < 300
            return response
        finally:
            if tracked:
                with self._lock:
                    self._in_flight -= 1

    async def _respond(self, kind: str, body: dict, entry: LoggedRequest, request: Request) -> Response:
        if not entry.probe:
            delay = self.latency_s if kind in LLM_KINDS else 0.0
            with self._lock:
                index = next((i for i, (kinds, _) in enumerate(self._delays) if kind in kinds), None)
                if index is not None:
                    delay += self._delays.pop(index)[1]
                index = next((i for i, (kinds, _, _) in enumerate(self._failures) if kind in kinds), None)
                failure = self._failures.pop(index) if index is not None else None
                if failure is None and self._failure_rate is not None and kind in LLM_KINDS:
                    rate, rng = self._failure_rate
                    if rng.random() < rate:
                        failure = (frozenset(), 500, None)
            if delay > 0:
                await asyncio.sleep(delay)
            if failure is not None:
                _, status, retry_after = failure
                headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
                return _error(status, f"injected failure ({status})", headers)
            await self._gate(kind, entry)
            if self._closing:
                return _error(503, "the fake server is shutting down")
            if (delay > 0 or entry.held) and await request.is_disconnected():
                # The client (e.g. a killed worker) is gone: nothing is delivered, so nothing completes.
                return _error(499, "the client closed the connection")
        if self.responder is not None:
            result = self.responder(kind, body)
            if inspect.isawaitable(result):
                result = await result
            if result is not None:
                return self._scripted(kind, body, result, entry)
        return self._default(kind, body, entry)

    async def _gate(self, kind: str, entry: LoggedRequest) -> None:
        with self._lock:
            if self._gate_kinds is None or kind not in self._gate_kinds:
                return
            if self._gate_left > 0:
                self._gate_left = max(0, self._gate_left - entry.prompts)
                return
            waiter = _Waiter(asyncio.get_running_loop(), asyncio.Event(), entry)
            self._waiters.append(waiter)
            entry.held = True
        try:
            await waiter.event.wait()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def _json(self, entry: LoggedRequest, data: dict, status: int = 200) -> JSONResponse:
        entry.response = data
        return JSONResponse(data, status_code=status)

    def _scripted(self, kind: str, body: dict, result: Any, entry: LoggedRequest) -> Response:
        if isinstance(result, Response):
            return result
        if not isinstance(result, dict):
            raise TypeError(f"responder returned {type(result).__name__}; wanted None, a dict or a Response")
        if kind == CHAT and "choices" not in result and ("text" in result or "texts" in result):
            texts = result["texts"] if "texts" in result else [result["text"]]
            return self._chat(body, entry, texts=list(texts))
        if kind == COMPLETIONS and "choices" not in result and "token_logprobs" in result:
            return self._completions(body, entry, first_dist=dict(result["token_logprobs"]))
        return self._json(entry, result)

    def _default(self, kind: str, body: dict, entry: LoggedRequest) -> Response:
        if kind == MODELS:
            return self._json(entry, self._models())
        if kind == CHAT:
            return self._chat(body, entry)
        if kind == COMPLETIONS:
            return self._completions(body, entry)
        if kind == EMBEDDINGS:
            return self._embeddings(body, entry)
        if kind == TOKENIZE:
            return self._tokenize(body, entry)
        return self._detokenize(body, entry)

    # ------------------------------------------------------------------ default answers

    def _check_model(self, body: dict) -> Response | None:
        model = body.get("model")
        if model is not None and model != self.model:
            return _error(404, f"The model `{model}` does not exist.")
        return None

    def _models(self) -> dict:
        created = int(time.time())
        entry = {
            "id": self.model, "object": "model", "created": created, "owned_by": "vllm", "root": self.model,
            "parent": None, "max_model_len": MAX_MODEL_LEN,
        }  # fmt: skip
        return {"object": "list", "data": [entry]}

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        total = prompt_tokens + completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}

    def _chat(self, body: dict, entry: LoggedRequest, texts: list[str] | None = None) -> Response:
        if (error := self._check_model(body)) is not None:
            return error
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error(400, "messages: a non-empty list is required")
        n = body.get("n") or 1
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        seed = body.get("seed")
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 512
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        rendered = self.toy.render_chat(messages)
        if texts is None:
            texts = [self.toy.chat_text(rendered, temperature=temperature, seed=seed, index=i) for i in range(n)]
        choices, completion_tokens = [], 0
        for i, text in enumerate(texts):
            text, finish = self._cut(text, stop, max_tokens)
            completion_tokens += len(self.toy.token_strings(text))
            message = {"role": "assistant", "content": text}
            choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
        prompt_tokens = len(self.toy.encode(rendered, add_special_tokens=True))
        data = {
            "id": f"chatcmpl-{entry.index}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model, "choices": choices, "usage": self._usage(prompt_tokens, completion_tokens),
        }  # fmt: skip
        return self._json(entry, data)

    def _cut(self, text: str, stop: list[str], max_tokens: int) -> tuple[str, str]:
        finish = "stop"
        cut = min((text.find(s) for s in stop if s and s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        tokens = self.toy.token_strings(text)
        if len(tokens) > max_tokens:
            text, finish = "".join(tokens[:max_tokens]), "length"
        return text, finish

    def _completions(self, body: dict, entry: LoggedRequest, first_dist: dict[str, float] | None = None) -> Response:
        if (error := self._check_model(body)) is not None:
            return error
        if "prompt_embeds" in body:  # the toy model has no embeddings: vLLM without --enable-prompt-embeds
            return _error(400, "You must set `--enable-prompt-embeds` to input `prompt_embeds`.")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1 and not self.supports_prompt_lists:
            return _error(400, "prompt: this server takes a single prompt")
        prompts = prompt if isinstance(prompt, list) and prompt else [prompt]
        if not all(isinstance(p, str) for p in prompts):
            return _error(400, "prompt: a string or a list of strings is required")
        if "prompt_logprobs" in body and body["prompt_logprobs"] is not None:
            return _error(400, "prompt_logprobs: not supported by the fake (it defeats prefix caching anyway)")
        k = body.get("logprobs")
        if k is not None and (not isinstance(k, int) or k < 0):
            return _error(400, "logprobs: must be a non-negative integer")
        if k is not None and k > self.max_logprobs:
            message = f"Requested sample logprobs of {k}, which is greater than max allowed: {self.max_logprobs}"
            return _error(400, message)
        named = body.get("logprob_token_ids")
        if named is not None and not self.supports_logprob_token_ids:
            if not self.ignore_unknown_fields:
                return _error(400, "logprob_token_ids: Extra inputs are not permitted")
            named = None
        if named:
            if k is None:
                return _error(400, "logprob_token_ids requires logprobs to be set")
            if not all(isinstance(t, int) for t in named):
                return _error(400, "logprob_token_ids: a list of integers is required")
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        n = body.get("n") or 1
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        temperature = float(body["temperature"]) if body.get("temperature") is not None else 1.0
        seed = body.get("seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)

        choices, completion_tokens, prompt_tokens = [], 0, 0
        for number, prompt in enumerate(prompts):
            choices += self._complete_one(prompt, number * n, n, max_tokens, temperature, seed, stop, k, named, as_ids,
                                          first_dist)  # fmt: skip
            completion_tokens += sum(c.pop("_tokens") for c in choices[-n:])
            prompt_tokens += len(self.toy.encode(prompt, add_special_tokens=True))
        data = {
            "id": f"cmpl-{entry.index}", "object": "text_completion", "created": int(time.time()),
            "model": self.model, "choices": choices, "usage": self._usage(prompt_tokens, completion_tokens),
        }  # fmt: skip
        return self._json(entry, data)

    def _complete_one(self, prompt, first_index, n, max_tokens, temperature, seed, stop, k, named, as_ids, first_dist):
        """The `n` choices for one prompt (indices from `first_index`), each with its token count in `_tokens`."""
        candidates = self.toy.candidates(prompt)
        choices = []
        for index in range(n):
            rng = random.Random(f"{prompt}|{seed}|{temperature}|{index}") if seed is not None else random.Random()
            generated: list[str] = []
            tokens, token_logprobs, tops, offsets = [], [], [], []
            finish = "length"
            for step in range(min(max_tokens, 512)):
                text = prompt + "".join(generated)
                if step == 0 and first_dist is not None:
                    dist = dict(first_dist)
                else:
                    dist = self.toy.next_token_logprobs(text, candidates)
                if temperature == 0:
                    token = max(dist, key=lambda t: (dist[t], t))
                else:
                    weights = [math.exp(v / temperature) for v in dist.values()]
                    token = rng.choices(list(dist), weights=weights)[0]
                offsets.append(len("".join(generated)))
                generated.append(token)
                if k is not None:
                    tokens.append(self._key(token, as_ids))
                    token_logprobs.append(dist[token])
                    tops.append(self._top(text, dist, token, k, named, as_ids))
                out = "".join(generated)
                if any(s and s in out for s in stop):
                    finish = "stop"
                    break
            text, _ = self._cut("".join(generated), stop, max_tokens)
            logprobs = None
            if k is not None:
                logprobs = {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens,
                            "top_logprobs": tops}  # fmt: skip
            choices.append(
                {"index": first_index + index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                 "_tokens": len(generated)}
            )  # fmt: skip
        return choices

    def _key(self, token: str, as_ids: bool) -> str:
        return f"token_id:{self.toy.token_id(token)}" if as_ids else token

    def _top(
        self, text: str, dist: dict[str, float], sampled: str, k: int, named: list[int] | None, as_ids: bool
    ) -> dict[str, float]:
        """One position's `top_logprobs`: the sampled token, then the named ids or the k best."""
        top = {self._key(sampled, as_ids): dist[sampled]}
        if named:
            for token_id in named:
                token = self.toy.token_string(token_id)
                if token is None:
                    value = OOV_LOGPROB - 5.0 * _unit("oov-id", text, token_id)
                    top[f"token_id:{token_id}" if as_ids else f"<unk_{token_id}>"] = value
                else:
                    value = dist[token] if token in dist else OOV_LOGPROB - 5.0 * _unit("oov", text, token)
                    top[self._key(token, as_ids)] = value
            return top
        for token, value in sorted(dist.items(), key=lambda item: (-item[1], item[0]))[:k]:
            top[self._key(token, as_ids)] = value
        return top

    def _embeddings(self, body: dict, entry: LoggedRequest) -> Response:
        if not self.supports_embeddings:
            return _error(404, "Not Found")
        if (error := self._check_model(body)) is not None:
            return error
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return _error(400, "input: a string or a non-empty list of strings is required")
        items = [{"object": "embedding", "index": i, "embedding": self.toy.embedding(t)} for i, t in enumerate(texts)]
        prompt_tokens = sum(len(self.toy.encode(t, add_special_tokens=True)) for t in texts)
        data = {"object": "list", "data": items, "model": self.model, "usage": self._usage(prompt_tokens, 0)}
        return self._json(entry, data)

    def _tokenize(self, body: dict, entry: LoggedRequest) -> Response:
        if not self.supports_tokenize:
            return _error(404, "Not Found")
        if (error := self._check_model(body)) is not None:
            return error
        add_special = body.get("add_special_tokens", True)
        if "messages" in body:
            text = self.toy.render_chat(body["messages"])
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return _error(400, "prompt: a string is required")
        tokens = self.toy.encode(text, add_special_tokens=bool(add_special))
        strs = [self.toy.token_string(t) for t in tokens] if body.get("return_token_strs") else None
        data = {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens, "token_strs": strs}
        return self._json(entry, data)

    def _detokenize(self, body: dict, entry: LoggedRequest) -> Response:
        if not self.supports_tokenize:
            return _error(404, "Not Found")
        if (error := self._check_model(body)) is not None:
            return error
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return _error(400, "tokens: a list of integers is required")
        return self._json(entry, {"prompt": self.toy.decode(tokens)})


# ---------------------------------------------------------------------- the server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class FakeVLLMServer(FakeVLLM):
    """`FakeVLLM` served by uvicorn on a background thread; a context manager.

    `port=0` binds a free port; `.port`, `.url` ("http://127.0.0.1:PORT") and `.base_url` (url + "/v1")
    are known once started. `stop()` then `start()` again serves the same port (and keeps the log).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        super().__init__(**options)
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _bind(self) -> socket.socket:
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the proto says
        # TCP, and without it every keep-alive answer waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        return sock

    def _make_server(self) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            loop="asyncio",
            http="h11",
            timeout_graceful_shutdown=2,
        )
        return uvicorn.Server(config)

    def start(self, timeout: float = 10.0) -> FakeVLLMServer:
        if self._thread is not None:
            return self
        self._closing = False
        sock = self._bind()
        self._server = self._make_server()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"fake-vllm-{self.port}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError(f"the fake vLLM server did not start on port {self.port}")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving; held requests are answered 503 (never completed)."""
        if self._thread is None or self._server is None:
            return
        self._closing = True
        self.release()
        self._server.should_exit = True
        self._thread.join(timeout)
        self._thread = None
        self._server = None

    def serve_forever(self) -> None:
        """Serve on the calling (main) thread until SIGINT/SIGTERM; prints the URL once listening."""
        sock = self._bind()
        server = self._make_server()
        announcer = threading.Thread(target=self._announce, args=(server,), daemon=True)
        announcer.start()
        server.run(sockets=[sock])

    def _announce(self, server: uvicorn.Server) -> None:
        while not server.started:
            time.sleep(0.005)
        print(f"FAKE_VLLM_URL={self.base_url}", flush=True)

    def __enter__(self) -> FakeVLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake vLLM server for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-logprob-token-ids", action="store_true", help="reject logprob_token_ids (400)")
    parser.add_argument("--ignore-unknown-fields", action="store_true", help="ignore fields it does not support")
    parser.add_argument("--no-tokenize", action="store_true", help="no /tokenize or /detokenize (404)")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--embeddings", action="store_true", help="serve /v1/embeddings (else 404)")
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    server = FakeVLLMServer(
        host=args.host,
        port=args.port,
        model=args.model,
        supports_logprob_token_ids=not args.no_logprob_token_ids,
        ignore_unknown_fields=args.ignore_unknown_fields,
        supports_tokenize=not args.no_tokenize,
        max_logprobs=args.max_logprobs,
        supports_embeddings=args.embeddings,
        latency_s=args.latency_s,
    )
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
