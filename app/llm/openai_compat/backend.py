"""`OpenAICompatBackend`: vLLM first, any OpenAI-compatible server as far as it goes.

One instance per configured backend name and process (the registry sees to that); each owns one transport (one
keep-alive pool) and one in-flight limit, so the limit holds across every job a worker runs at once.

Calls:
  * `generate`        -> `POST /v1/chat/completions`, one request per prompt (the server applies the chat
      template); a request with `n` samples counts `n` sequences against the limit.
  * `label_logprobs`  -> `POST /v1/completions` with `max_tokens=1, temperature=0`, up to `prompts_per_request`
      prompts in one request (a list; each answered by its own choice `index`), and either
      `logprob_token_ids=[first token id of each verbalizer]` (newer vLLM; ids from `POST /tokenize`) or
      `logprobs=k` (top-k, matched against the verbalizers' first-token strings; a verbalizer outside the top-k
      scores -inf). `prompt_logprobs` is never used: it defeats vLLM's prefix caching. Requests behind a soft
      prompt are sent as `prompt_embeds` (see `embeds`).
  * `features`        -> `POST /v1/embeddings` (where the probe found it), up to `prompts_per_request` texts in one
      request; the vector is whatever the server's pooling makes of the text (a request's `pooling` is not sent).

Requests go out in the order they were issued, so the examples of one candidate prompt reach the server
together (prefix-cache hits), and a job's answers stream back to `on_result` request by request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp

from app.llm.inflight import InFlightLimit, QueueFeedback, parse_vllm_queue
from app.llm.openai_compat.embeds import PromptEmbedder
from app.llm.openai_compat.probe import LABEL_MODE_TOKEN_IDS, LABEL_MODE_TOP_K, CapabilityProbe
from app.llm.openai_compat.responses import (
    choices_of,
    embeddings_of,
    estimate_tokens,
    first_top_logprobs,
    split_total,
    token_id_key,
)
from app.llm.openai_compat.transport import BackendHTTPError, Transport
from app.llm.port import (
    BackendError,
    BackendInfo,
    Capability,
    CapabilityMissing,
    FeatureRequest,
    Features,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
    OnResult,
    PrefixKind,
)
from app.settings import BackendSettings

log = logging.getLogger(__name__)

KIND = "openai_compat"
# vLLM's default `--max-logprobs`; also the OpenAI chat API's `top_logprobs` ceiling.
DEFAULT_MAX_LOGPROBS = 20
_NEVER = frozenset({Capability.DEEP_PROMPT, Capability.TOKEN_EMBEDDINGS})
_DEFAULT_UNPROBED = ("generate", "label_logprobs")
# How often the server's queue is read while this process has requests in flight.
QUEUE_POLL_S = 1.0
_T = TypeVar("_T")


class OpenAICompatBackend(CapabilityProbe):
    """`LLMBackend` over HTTP."""

    kind = KIND

    def __init__(
        self,
        name: str,
        settings: BackendSettings,
        *,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
        defer_prompt_embeds: bool = False,
    ) -> None:
        """`defer_prompt_embeds`: leave the embedding weights unread at start-up (the API; see `probe`)."""
        if not settings.base_url:
            raise ValueError(f"backend {name!r}: openai_compat needs a base_url (e.g. http://vllm:8000/v1)")
        self.name = name
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        # vLLM serves /tokenize, /detokenize and /metrics at the server root, not under /v1.
        self.root_url = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self._transport = Transport(name, settings, self.root_url)
        self._limit = InFlightLimit(settings.max_concurrency)
        self._share = settings.max_concurrency  # this process's share of the limit (set by the worker)
        self._feedback = QueueFeedback(settings.max_concurrency) if settings.adapt_to_server_queue else None
        self._queue_task: asyncio.Task | None = None
        self._start_lock = asyncio.Lock()
        self._started = False
        self._max_logprobs = max(1, max_logprobs)
        self._prompts_per_request = settings.prompts_per_request

        configured = self._configured_capabilities()
        self._model_id = settings.model or ""
        self._label_mode: str | None = LABEL_MODE_TOP_K if Capability.LABEL_LOGPROBS in configured else None
        self._tokenize_ok = False
        self._detokenize_ok: bool | None = None  # None: not tried yet
        # Verbalizer text -> its first token id / first token string (label sets are small: no eviction).
        self._first_token_ids: dict[str, int | None] = {}
        self._first_token_strs: dict[str, str | None] = {}
        self._embedder = PromptEmbedder(name, settings, self._tokenize)
        self._defer_prompt_embeds = defer_prompt_embeds
        self._prompt_embeds_pending = False  # deferred, and not checked yet
        self._prompt_embeds_lock = asyncio.Lock()
        self._detail: dict[str, Any] = {"base_url": self.base_url, "probed": False}
        caps = configured if (not settings.probe or settings.capabilities is not None) else {Capability.GENERATE}
        self._info = self._make_info(frozenset(caps))

    # ------------------------------------------------------------------ protocol: info / lifecycle

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def start(self) -> None:
        """Probe the server once (idempotent; a failed probe is tried again on the next call)."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            if self.settings.probe:
                await self._probe()
            else:
                self._detail.update(
                    label_mode=self._label_mode,
                    max_logprobs=self._max_logprobs,
                    prompts_per_request=self._prompts_per_request,
                )
                self._info = self._make_info(self._configured_capabilities())
            self._started = True

    async def aclose(self) -> None:
        if self._queue_task is not None:
            self._queue_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_task
        await self._transport.aclose()

    async def health(self) -> None:
        """One cheap request (the model list, no retries): raises while the server is down."""
        await self._request("GET", f"{self.base_url}/models", probe=True, max_retries=0)

    async def __aenter__(self) -> OpenAICompatBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def count_tokens_upper_bound(self, text: str) -> int:
        """Bytes + 16.

        Every token of a byte-level BPE or a SentencePiece tokenizer with byte fallback covers at least
        one byte of UTF-8, so a text never costs more tokens than it has bytes; we have no tokenizer on
        this side to do better without a round trip. The +16 covers BOS/EOS and the chat template's role
        markers. For ordinary text the byte count is already ~3-4x the real token count, so the bound
        stays safe even for templates that add more than 16 tokens, except for near-empty prompts.
        """
        return len(text.encode("utf-8")) + 16

    # ------------------------------------------------------------------ concurrency

    @property
    def in_flight(self) -> int:
        return self._limit.in_flight

    @property
    def concurrency_limit(self) -> int:
        return self._limit.limit

    @property
    def share(self) -> int:
        return self._share

    def set_share(self, share: int) -> None:
        """This process's share of `max_concurrency` (the worker divides it among the workers using the backend)."""
        self._share = max(1, min(int(share), self.settings.max_concurrency))
        if self._feedback is not None:
            self._feedback.set_ceiling(self._share)
            self._limit.set_limit(self._feedback.limit)
        else:
            self._limit.set_limit(self._share)

    def _watch_queue(self) -> None:
        if self._feedback is not None and (self._queue_task is None or self._queue_task.done()):
            self._queue_task = asyncio.create_task(self._queue_watch(), name=f"queue-watch-{self.name}")

    async def _queue_watch(self) -> None:
        """Read the server's running/waiting counts (vLLM `/metrics`) while requests are in flight, and fit the
        limit to them (`QueueFeedback`). A server without those metrics is not asked again."""
        assert self._feedback is not None
        url = f"{self.root_url}/metrics"
        while self._limit.in_flight or self._limit.waiting:
            try:
                text = await self._transport.text(url)
            except (BackendError, aiohttp.ClientError, TimeoutError) as exc:
                log.info("backend %s: no queue metrics (%s); the limit stays at %d", self.name, exc, self._share)
                self._feedback = None
                self._limit.set_limit(self._share)
                return
            queue = parse_vllm_queue(text)
            if queue is None:
                log.info("backend %s: /metrics has no vLLM queue gauges; the limit stays fixed", self.name)
                self._feedback = None
                self._limit.set_limit(self._share)
                return
            self._limit.set_limit(self._feedback.update(*queue))
            await asyncio.sleep(QUEUE_POLL_S)

    # ------------------------------------------------------------------ protocol: calls

    async def generate(self, requests: list[GenerationRequest], on_result: OnResult | None = None) -> list[Generation]:
        await self.start()
        self._require(Capability.GENERATE)
        requests = list(requests)
        units = [[i] for i in range(len(requests))]
        return await self._fan_out(requests, units, lambda unit: unit[0].n, self._generate_unit, on_result)

    async def label_logprobs(
        self, requests: list[LabelScoreRequest], on_result: OnResult | None = None
    ) -> list[LabelScores]:
        await self.start()
        self._require(Capability.LABEL_LOGPROBS)
        requests = list(requests)
        for request in requests:
            if request.prefix is not None:
                if request.prefix.kind not in (PrefixKind.INPUT, PrefixKind.INPUT_ADD):
                    raise CapabilityMissing(f"backend {self.name!r} cannot take {request.prefix.kind.value} prefixes")
                await self._confirm_prompt_embeds()
                self._require(Capability.INPUT_EMBEDDINGS)
        verbalizers = sorted({v for r in requests for v in r.verbalizers})
        if self._label_mode == LABEL_MODE_TOKEN_IDS:
            await self._resolve(verbalizers, self._first_token_ids, self._tokenize_first)
        else:
            await self._resolve(verbalizers, self._first_token_strs, self._first_token_text)
        return await self._fan_out(requests, self._label_units(requests), len, self._label_unit, on_result)

    async def features(self, requests: list[FeatureRequest], on_result: OnResult | None = None) -> list[Features]:
        await self.start()
        self._require(Capability.FEATURES)
        requests = list(requests)
        size = self.settings.prompts_per_request  # every OpenAI-compatible embeddings route takes a list of inputs
        units = [list(range(start, min(start + size, len(requests)))) for start in range(0, len(requests), size)]
        return await self._fan_out(requests, units, len, self._features_unit, on_result)

    def _label_units(self, requests: list[LabelScoreRequest]) -> list[list[int]]:
        """Consecutive requests, up to `prompts_per_request` a unit; text and embedded prompts never share one."""
        units: list[list[int]] = []
        for i, request in enumerate(requests):
            embedded = request.prefix is not None
            if (
                units
                and len(units[-1]) < self._prompts_per_request
                and (requests[units[-1][0]].prefix is not None) == embedded
            ):
                units[-1].append(i)
            else:
                units.append([i])
        return units

    # ------------------------------------------------------------------ one request each

    async def _generate_unit(self, unit: list[GenerationRequest]) -> list[Generation]:
        (request,) = unit
        messages = []
        if request.system is not None:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        body = self._body(
            messages=messages, max_tokens=request.max_tokens, temperature=request.temperature, n=request.n
        )
        if request.seed is not None:
            body["seed"] = request.seed
        if request.stop:
            body["stop"] = list(request.stop)
        data = await self._request("POST", f"{self.base_url}/chat/completions", body)
        choices = choices_of(data, self.name)
        texts = [(choice.get("message") or {}).get("content") or "" for choice in choices]
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            prompt_tokens = estimate_tokens((request.system or "") + request.prompt)
        completion_tokens = usage.get("completion_tokens")
        if completion_tokens is None:
            completion_tokens = sum(estimate_tokens(text) for text in texts)
        return [Generation(texts=texts, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens))]

    async def _label_unit(self, unit: list[LabelScoreRequest]) -> list[LabelScores]:
        """One `/v1/completions` request scoring every prompt of `unit` (a list, or a single prompt)."""
        by_ids = self._label_mode == LABEL_MODE_TOKEN_IDS
        if by_ids:
            wanted = sorted({i for r in unit for v in r.verbalizers if (i := self._first_token_ids[v]) is not None})
            if not wanted:  # no verbalizer has a token: nothing to ask
                return [LabelScores([-math.inf] * len(r.verbalizers), 0, 0) for r in unit]
            k = min(len(wanted), self._max_logprobs)
        else:
            k = self._max_logprobs
        if unit[0].prefix is None:
            prompts: Any = [r.prompt for r in unit]
            body = self._label_body(prompts if len(unit) > 1 else prompts[0], k)
        else:
            embeds = await self._embedder.prompt_embeds_many([(r.prompt, r.prefix) for r in unit])
            body = self._label_body({"prompt_embeds": embeds if len(unit) > 1 else embeds[0]}, k)
        if by_ids:
            body["logprob_token_ids"] = wanted
            body["return_tokens_as_token_ids"] = True
        data = await self._request("POST", f"{self.base_url}/completions", body)
        choices = choices_of(data, self.name)
        if len(choices) != len(unit):
            raise BackendError(f"{self.name}: {len(unit)} prompts were answered with {len(choices)} choices")
        usage = data.get("usage") or {}
        sizes = [estimate_tokens(r.prompt) + (r.prefix.length if r.prefix else 0) for r in unit]
        prompt_total = usage.get("prompt_tokens")
        prompt_tokens = split_total(int(prompt_total), sizes) if prompt_total is not None else sizes
        completion_total = usage.get("completion_tokens")
        completion_tokens = (
            split_total(int(completion_total), [1] * len(unit)) if completion_total is not None else [1] * len(unit)
        )
        out = []
        for request, choice, p_tokens, c_tokens in zip(unit, choices, prompt_tokens, completion_tokens, strict=True):
            top = first_top_logprobs(choice)
            if by_ids:
                found = {}
                for key, value in top.items():
                    token_id = token_id_key(key)
                    if token_id is not None and value is not None:
                        found[token_id] = float(value)
                ids = [self._first_token_ids[v] for v in request.verbalizers]
                logprobs = [found.get(i, -math.inf) if i is not None else -math.inf for i in ids]
            else:
                logprobs = []
                for verbalizer in request.verbalizers:
                    token = self._first_token_strs[verbalizer]
                    value = top.get(token) if token else None
                    logprobs.append(float(value) if value is not None else -math.inf)
            out.append(LabelScores(logprobs, int(p_tokens), int(c_tokens)))
        return out

    async def _features_unit(self, unit: list[FeatureRequest]) -> list[Features]:
        """One `/v1/embeddings` request for the texts of `unit`."""
        body = self._embeddings_body([r.text for r in unit])
        data = await self._request("POST", f"{self.base_url}/embeddings", body)
        vectors = embeddings_of(data, len(unit), self.name)
        sizes = [max(1, estimate_tokens(r.text)) for r in unit]
        total = (data.get("usage") or {}).get("prompt_tokens")
        tokens = split_total(int(total), sizes) if total is not None else sizes
        return [Features.of(vector, n) for vector, n in zip(vectors, tokens, strict=True)]

    def _embeddings_body(self, texts: list[str]) -> dict[str, Any]:
        return self._body(input=texts, encoding_format="float")

    def _label_body(self, prompt: str | list[str] | dict[str, Any], k: int) -> dict[str, Any]:
        """A one-token scoring completion of `prompt`: text(s), or the input fields (`prompt_embeds`) themselves."""
        fields = prompt if isinstance(prompt, dict) else {"prompt": prompt}
        return self._body(**fields, max_tokens=1, temperature=0, logprobs=k)

    # ------------------------------------------------------------------ prompt embeddings (soft prompts)

    async def embedding_std(self) -> float:
        """Standard deviation of all entries of the input embedding matrix (BBT's projection scale)."""
        await self._confirm_prompt_embeds()
        matrix = await self._embedding_matrix()
        return float(await asyncio.to_thread(matrix.std))

    async def _embedding_matrix(self) -> Any:
        known = self._embedder.matrix is not None
        matrix = await self._embedder.embedding_matrix()
        if not known:
            self._info = self._make_info(self._info.capabilities)  # now with the hidden size
        return matrix

    def _body(self, **fields: Any) -> dict[str, Any]:
        """A request body naming the model (left out when none is known: the server's default)."""
        return {"model": self._model_id, **fields} if self._model_id else dict(fields)

    # ------------------------------------------------------------------ verbalizer first tokens

    async def _resolve(self, verbalizers: list[str], cache: dict, compute: Callable[[str], Awaitable[Any]]) -> None:
        """Fill `cache` for verbalizers not seen yet (two batches at once may both ask: harmless)."""
        missing = [v for v in verbalizers if v not in cache]
        if missing:
            values = await asyncio.gather(*(compute(v) for v in missing))
            cache.update(zip(missing, values, strict=True))

    async def _tokenize(
        self, text: str, *, add_special_tokens: bool = False, probe: bool = False, max_retries: int | None = None
    ) -> list[int]:
        body = self._body(prompt=text, add_special_tokens=add_special_tokens)
        data = await self._request("POST", f"{self.root_url}/tokenize", body, probe=probe, max_retries=max_retries)
        tokens = data.get("tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BackendError(f"{self.name}: /tokenize answered without a token list")
        return tokens

    async def _tokenize_first(self, verbalizer: str) -> int | None:
        tokens = await self._tokenize(verbalizer)
        return tokens[0] if tokens else None

    async def _first_token_text(self, verbalizer: str) -> str | None:
        """The string a top-k answer would use as the key of the verbalizer's first token.

        With `/tokenize` and `/detokenize` (vLLM): the first token decoded on its own. Without them the
        verbalizer itself, i.e. single-token verbalizers are assumed.
        """
        if not verbalizer:
            return None
        if not self._tokenize_ok or self._detokenize_ok is False:
            return verbalizer
        tokens = await self._tokenize(verbalizer)
        if not tokens:
            return None
        body = self._body(tokens=tokens[:1])
        try:
            data = await self._request("POST", f"{self.root_url}/detokenize", body)
        except BackendHTTPError as exc:
            if exc.status >= 500:
                raise
            self._detokenize_ok = False
            log.info("backend %s: /detokenize unavailable (%s); verbalizers taken as whole tokens", self.name, exc)
            return verbalizer if len(tokens) == 1 else None
        self._detokenize_ok = True
        text = data.get("prompt") if isinstance(data, dict) else None
        return text if isinstance(text, str) and text else None

    # ------------------------------------------------------------------ plumbing

    async def _request(
        self, method: str, url: str, body: dict | None = None, *, probe: bool = False, max_retries: int | None = None
    ) -> Any:
        return await self._transport.request(method, url, body, probe=probe, max_retries=max_retries)

    def _configured_capabilities(self) -> frozenset[Capability]:
        names = self.settings.capabilities if self.settings.capabilities is not None else list(_DEFAULT_UNPROBED)
        caps = set()
        for name in names:
            try:
                cap = Capability(name)
            except ValueError:
                raise ValueError(f"backend {self.name!r}: unknown capability {name!r}") from None
            if cap in _NEVER:
                log.warning("backend %s: an OpenAI-compatible server cannot offer %s; ignored", self.name, name)
                continue
            caps.add(cap)
        return frozenset(caps)

    def _make_info(self, caps: frozenset[Capability]) -> BackendInfo:
        matrix = self._embedder.matrix
        geometry = {"hidden_size": int(matrix.shape[1])} if matrix is not None else {}
        return BackendInfo(
            name=self.name,
            kind=KIND,
            model_id=self._model_id,
            capabilities=frozenset(caps),
            max_concurrency=self.settings.max_concurrency,
            detail=dict(self._detail),
            geometry=geometry,
        )

    def _require(self, capability: Capability) -> None:
        if capability not in self._info.capabilities:
            why = self._detail.get("prompt_embeds") if capability == Capability.INPUT_EMBEDDINGS else None
            raise CapabilityMissing(
                f"backend {self.name!r} lacks capability {capability.value!r}"
                + (f" (prompt_embeds {why})" if why else "")
            )

    async def _fan_out(
        self,
        requests: Sequence[Any],
        units: list[list[int]],
        weight: Callable[[list[Any]], int],
        call: Callable[[list[Any]], Awaitable[list[_T]]],
        on_result: OnResult | None,
    ) -> list[_T]:
        """Send each unit (one HTTP request: the requests at those indices) under the in-flight limit, units in
        order.

        Tasks are created in order and the limit serves waiters first come, first served, so unit i always goes
        out before unit i+1. After the first failure no further unit is sent, but those already in flight finish
        and their answers reach `on_result` (cancelling them would throw away answers the server already
        computed, to be asked again); then the failure is raised. Cancelling the caller cancels everything.
        """
        results: list[Any] = [None] * len(requests)
        failed = False

        async def one(unit: list[int]) -> None:
            nonlocal failed
            batch = [requests[i] for i in unit]
            taken = await self._limit.acquire(weight(batch))
            try:
                if failed:
                    return
                try:
                    answers = await call(batch)
                except BaseException:
                    failed = True
                    raise
            finally:
                self._limit.release(taken)
            for i, answer in zip(unit, answers, strict=True):
                results[i] = answer
                if on_result is not None:
                    on_result(i, answer)

        tasks = [asyncio.create_task(one(unit)) for unit in units]
        if not tasks:
            return []
        self._watch_queue()  # after the tasks: by the time it runs they hold or wait for slots
        try:
            await asyncio.wait(tasks)
        finally:
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()
        return results
