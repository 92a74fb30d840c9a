"""HTTP backend for vLLM or any other OpenAI-compatible server.

One instance per configured backend name and process (the registry sees to that); each instance owns
one `httpx.AsyncClient` (one connection pool) and one `asyncio.Semaphore(max_concurrency)`, so the
limit holds across every job a worker runs at once.

Calls:
  * `generate`        -> `POST /v1/chat/completions` (the server applies the model's chat template).
  * `label_logprobs`  -> `POST /v1/completions` on the raw prompt with `max_tokens=1, temperature=0`, and
      either `logprob_token_ids=[first token id of each verbalizer]` (newer vLLM; ids from `POST /tokenize`)
      or `logprobs=k` (top-k, matched against the verbalizers' first-token strings; a verbalizer outside
      the top-k scores -inf). `prompt_logprobs` is never used: it defeats vLLM's prefix caching.
      A request behind an input-layer soft prompt (BBT) is sent as `prompt_embeds` instead of `prompt`: the
      prompt's tokens (server `/tokenize`) embedded with the served model's matrix (`embedding_weights`), the
      soft prompt's vectors after any leading special tokens, as the local runner places them; an additive
      soft prompt (BBT's default form) instead adds its vectors to the rows of its placeholder tokens.

Failures: connection errors, timeouts, 408, 429 and 5xx are retried with full-jitter exponential backoff
(`Retry-After` honoured); any other 4xx raises `BackendHTTPError` at once with the server's message.
A request keeps its concurrency slot while it backs off, so an overloaded server sees less traffic.

Probe requests (in `start()`) carry the header `X-Promptopt-Probe: 1`, so a test server can tell
them from the calls a job is charged for.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
import numpy as np

from app.llm.port import (
    SEND_GATE,
    BackendError,
    BackendInfo,
    BackendUnavailable,
    Capability,
    CapabilityMissing,
    ContinuousPrefix,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
    OnResult,
    PrefixKind,
    anchor_bounds,
    leading_special_ids,
    placeholder_span,
    soft_prompt_position,
)
from app.settings import BackendSettings

log = logging.getLogger(__name__)

KIND = "openai_compat"
PROBE_HEADER = "X-Promptopt-Probe"
# Full-jitter backoff never waits longer than this between two attempts.
MAX_BACKOFF_S = 20.0
# A server asking for more than this in `Retry-After` is not waited on longer than this.
MAX_RETRY_AFTER_S = 60.0
# Probes at start-up give up sooner than job calls, so a dead backend does not hold up a start.
PROBE_MAX_RETRIES = 2
# vLLM's default `--max-logprobs`; also the OpenAI chat API's `top_logprobs` ceiling.
DEFAULT_MAX_LOGPROBS = 20

LABEL_MODE_TOKEN_IDS = "token_ids"  # logprob_token_ids + return_tokens_as_token_ids
LABEL_MODE_TOP_K = "top_k"  # logprobs=k, keys are decoded token strings

_RETRYABLE_TRANSPORT_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
_NEVER = frozenset({Capability.DEEP_PROMPT, Capability.TOKEN_EMBEDDINGS})
# The probe's prompt_embeds answer must match its text answer this closely, or the embedding weights are not
# the served model's (bf16 serving moves a log-prob by a few hundredths).
PROMPT_EMBEDS_TOLERANCE = 0.1
# A text whose next token a model predicts with some confidence, so wrong embeddings show.
_PROBE_TEXT = "The capital of France is the city of"
# Token ids of prompts sent as embeddings, kept per text (BBT re-sends each training example per candidate).
_TOKEN_ID_CACHE_SIZE = 4096
_DEFAULT_UNPROBED = ("generate", "label_logprobs")
_MAX_ALLOWED_RE = re.compile(r"max(?:imum)?[ _]?(?:allowed|logprobs)?\D{0,16}?(\d+)", re.IGNORECASE)
_T = TypeVar("_T")


class BackendHTTPError(BackendError):
    """The server answered with an error status (a 4xx at once, or a 5xx/429 once retries ran out)."""

    def __init__(self, message: str, *, status: int, server_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        # A server error or "too many requests" passes; a request the server rejects will be rejected again.
        self.transient = status in _RETRYABLE_STATUSES or status >= 500


_RETRYABLE_STATUSES = (408, 429)


class OpenAICompatBackend:
    """`LLMBackend` over HTTP: vLLM first, any OpenAI-compatible server as far as it goes."""

    kind = KIND

    def __init__(
        self,
        name: str,
        settings: BackendSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        max_logprobs: int = DEFAULT_MAX_LOGPROBS,
    ) -> None:
        if not settings.base_url:
            raise ValueError(f"backend {name!r}: openai_compat needs a base_url (e.g. http://vllm:8000/v1)")
        self.name = name
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        # vLLM serves /tokenize and /detokenize at the server root, not under /v1.
        self.root_url = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        # The semaphore bounds requests in flight; the pool must not be the tighter limit.
        pool = settings.max_concurrency + 4
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s),
            limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        )
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        self._start_lock = asyncio.Lock()
        self._started = False
        self._random = random.Random()
        self._max_logprobs = max(1, max_logprobs)

        configured = self._configured_capabilities()
        self._model_id = settings.model or ""
        self._label_mode: str | None = LABEL_MODE_TOP_K if Capability.LABEL_LOGPROBS in configured else None
        self._tokenize_ok = False
        self._detokenize_ok: bool | None = None  # None: not tried yet
        # Verbalizer text -> its first token id / first token string (label sets are small: no eviction).
        self._first_token_ids: dict[str, int | None] = {}
        self._first_token_strs: dict[str, str | None] = {}
        # prompt_embeds (soft prompts): the served model's input embeddings, read from `embedding_weights` on
        # first use; the ids the server's tokenizer puts before a prompt's own tokens; prompt -> token ids.
        self._embeddings: Any = None
        self._embeddings_lock = asyncio.Lock()
        self._special_prefix: list[int] | None = None
        self._prompt_ids: OrderedDict[str, list[int]] = OrderedDict()
        self._detail: dict[str, Any] = {"base_url": self.base_url, "probed": False}
        if not settings.probe:
            caps = configured
        elif settings.capabilities is not None:
            caps = configured
        else:
            caps = frozenset({Capability.GENERATE})
        self._info = self._make_info(caps)

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
                self._detail.update(label_mode=self._label_mode, max_logprobs=self._max_logprobs)
                self._info = self._make_info(self._configured_capabilities())
            self._started = True

    async def aclose(self) -> None:
        await self._client.aclose()

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

    # ------------------------------------------------------------------ protocol: calls

    async def generate(self, requests: list[GenerationRequest], on_result: OnResult | None = None) -> list[Generation]:
        await self.start()
        self._require(Capability.GENERATE)
        return await self._fan_out(list(requests), self._generate_one, on_result)

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
                self._require(Capability.INPUT_EMBEDDINGS)
        verbalizers = sorted({v for r in requests for v in r.verbalizers})
        if self._label_mode == LABEL_MODE_TOKEN_IDS:
            await self._resolve(verbalizers, self._first_token_ids, self._tokenize_first)
            return await self._fan_out(requests, self._label_one_by_ids, on_result)
        await self._resolve(verbalizers, self._first_token_strs, self._first_token_text)
        return await self._fan_out(requests, self._label_one_by_top_k, on_result)

    # ------------------------------------------------------------------ one request each

    async def _generate_one(self, request: GenerationRequest) -> Generation:
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
        choices = _choices(data, self.name)
        texts = [(choice.get("message") or {}).get("content") or "" for choice in choices]
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            prompt_tokens = _estimate_tokens((request.system or "") + request.prompt)
        completion_tokens = usage.get("completion_tokens")
        if completion_tokens is None:
            completion_tokens = sum(_estimate_tokens(text) for text in texts)
        return Generation(texts=texts, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens))

    async def _label_one_by_ids(self, request: LabelScoreRequest) -> LabelScores:
        ids = [self._first_token_ids[v] for v in request.verbalizers]
        wanted = sorted({i for i in ids if i is not None})
        found: dict[int, float] = {}
        data: dict = {}
        if wanted:
            body = self._label_body(await self._label_input(request), min(len(wanted), self._max_logprobs))
            body["logprob_token_ids"] = wanted
            body["return_tokens_as_token_ids"] = True
            data = await self._request("POST", f"{self.base_url}/completions", body)
            for key, value in _first_top_logprobs(data, self.name).items():
                token_id = _token_id_key(key)
                if token_id is not None and value is not None:
                    found[token_id] = float(value)
        logprobs = [found.get(i, -math.inf) if i is not None else -math.inf for i in ids]
        return self._label_scores(request, data, logprobs)

    async def _label_one_by_top_k(self, request: LabelScoreRequest) -> LabelScores:
        body = self._label_body(await self._label_input(request), self._max_logprobs)
        data = await self._request("POST", f"{self.base_url}/completions", body)
        top = _first_top_logprobs(data, self.name)
        logprobs = []
        for verbalizer in request.verbalizers:
            token = self._first_token_strs[verbalizer]
            value = top.get(token) if token else None
            logprobs.append(float(value) if value is not None else -math.inf)
        return self._label_scores(request, data, logprobs)

    def _label_body(self, prompt: str | dict[str, Any], k: int) -> dict[str, Any]:
        """A one-token scoring completion of `prompt`: a text, or the input fields (`prompt_embeds`) themselves."""
        fields = {"prompt": prompt} if isinstance(prompt, str) else prompt
        return self._body(**fields, max_tokens=1, temperature=0, logprobs=k)

    async def _label_input(self, request: LabelScoreRequest) -> str | dict[str, Any]:
        if request.prefix is None:
            return request.prompt
        return {"prompt_embeds": await self._prompt_embeds(request.prompt, request.prefix)}

    # ------------------------------------------------------------------ prompt embeddings (soft prompts)

    async def _embedding_matrix(self) -> Any:
        """The served model's (vocab, hidden) input embeddings, read once from `embedding_weights`."""
        if self._embeddings is None:
            async with self._embeddings_lock:
                if self._embeddings is None:
                    if not self.settings.embedding_weights:
                        raise BackendError(
                            f"{self.name}: set embedding_weights (the served model's safetensors) to send soft prompts"
                        )
                    from app.llm.embedding_weights import load_input_embeddings

                    self._embeddings = await asyncio.to_thread(
                        load_input_embeddings, self.settings.embedding_weights, self.settings.embedding_tensor
                    )
                    self._info = self._make_info(self._info.capabilities)  # now with the hidden size
        return self._embeddings

    async def embedding_std(self) -> float:
        """Standard deviation of all entries of the input embedding matrix (BBT's projection scale)."""
        matrix = await self._embedding_matrix()
        return float(await asyncio.to_thread(matrix.std))

    async def _token_ids(self, prompt: str, *, probe: bool = False, max_retries: int | None = None) -> list[int]:
        """The prompt's ids as a completion would tokenize it (special tokens included), cached per text."""
        if prompt in self._prompt_ids:
            self._prompt_ids.move_to_end(prompt)
            return self._prompt_ids[prompt]
        ids = await self._tokenize(prompt, add_special_tokens=True, probe=probe, max_retries=max_retries)
        self._prompt_ids[prompt] = ids
        if len(self._prompt_ids) > _TOKEN_ID_CACHE_SIZE:
            self._prompt_ids.popitem(last=False)
        return ids

    async def _leading_special(self, *, probe: bool = False, max_retries: int | None = None) -> list[int]:
        """Ids the tokenizer puts before every prompt (a BOS, for some models; none for SmolLM2)."""
        if self._special_prefix is None:
            with_special = await self._tokenize("Hello", add_special_tokens=True, probe=probe, max_retries=max_retries)
            plain = await self._tokenize("Hello", probe=probe, max_retries=max_retries)
            self._special_prefix = leading_special_ids(with_special, plain)
        return self._special_prefix

    async def _prompt_embeds(
        self, prompt: str, prefix: ContinuousPrefix | None, *, probe: bool = False, max_retries: int | None = None
    ) -> str:
        """base64 of a torch-saved (tokens + prefix, hidden) float32 tensor, as vLLM reads `prompt_embeds`."""
        matrix = await self._embedding_matrix()
        special = await self._leading_special(probe=probe, max_retries=max_retries)
        ids = await self._token_ids(prompt, probe=probe, max_retries=max_retries)
        if ids and max(ids) >= matrix.shape[0]:
            raise BackendError(
                f"{self.name}: token id {max(ids)} is outside the {matrix.shape[0]}-row embedding_weights: "
                "they are not the served model's"
            )
        if prefix is not None and prefix.kind == PrefixKind.INPUT_ADD:
            # The additive form: the prompt's own rows, the vectors added to its placeholder tokens' rows.
            start, end = anchor_bounds(prompt, prefix.anchor)
            before = await self._token_ids(prompt[:start], probe=probe, max_retries=max_retries)
            through = await self._token_ids(prompt[:end], probe=probe, max_retries=max_retries)
            first, last = placeholder_span(ids, before, through, prefix.rows)
            if prefix.vectors.shape[1] != matrix.shape[1]:
                raise BackendError(
                    f"{self.name}: soft prompt of width {prefix.vectors.shape[1]} does not fit this model "
                    f"(hidden size {matrix.shape[1]})"
                )
            rows = matrix[ids].astype(np.float32, copy=True)
            rows[first:last] += prefix.vectors[: last - first]
            return await asyncio.to_thread(_encode_tensor, rows)
        head = soft_prompt_position(ids, special)
        parts = [matrix[ids[:head]]]
        if prefix is not None:
            if prefix.vectors.shape[1] != matrix.shape[1]:
                raise BackendError(
                    f"{self.name}: soft prompt of width {prefix.vectors.shape[1]} does not fit this model "
                    f"(hidden size {matrix.shape[1]})"
                )
            parts.append(prefix.vectors)
        parts.append(matrix[ids[head:]])
        return await asyncio.to_thread(_encode_tensor, np.concatenate(parts, axis=0))

    def _body(self, **fields: Any) -> dict[str, Any]:
        """A request body naming the model (left out when none is known: the server's default)."""
        return {"model": self._model_id, **fields} if self._model_id else dict(fields)

    def _label_scores(self, request: LabelScoreRequest, data: dict, logprobs: list[float]) -> LabelScores:
        usage = data.get("usage") or {}
        prompt_tokens = usage.get("prompt_tokens")
        if prompt_tokens is None:
            estimate = _estimate_tokens(request.prompt) + (request.prefix.length if request.prefix else 0)
            prompt_tokens = estimate if data else 0
        completion_tokens = usage.get("completion_tokens")
        if completion_tokens is None:
            completion_tokens = 1 if data else 0
        return LabelScores(
            logprobs=logprobs, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens)
        )

    # ------------------------------------------------------------------ verbalizer first tokens

    async def _resolve(self, verbalizers: list[str], cache: dict, compute: Callable[[str], Awaitable[Any]]) -> None:
        """Fill `cache` for verbalizers not seen yet (two batches at once may both ask: harmless)."""
        missing = [v for v in verbalizers if v not in cache]
        if missing:
            values = await self._fan_out(missing, compute, None)
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

    # ------------------------------------------------------------------ probe

    async def _probe(self) -> None:
        retries = min(self.settings.max_retries, PROBE_MAX_RETRIES)
        try:
            data = await self._request("GET", f"{self.base_url}/models", probe=True, max_retries=retries)
        except BackendHTTPError as exc:
            # Some OpenAI-compatible servers have no model list; a configured model is enough there.
            if exc.status >= 500 or not self.settings.model:
                raise
            data = {}
        data = data if isinstance(data, dict) else {}
        models = [m for m in (data.get("data") or []) if isinstance(m, dict) and m.get("id")]
        ids = [m["id"] for m in models]
        if self.settings.model:
            if ids and self.settings.model not in ids:
                raise BackendError(f"{self.name}: model {self.settings.model!r} is not served; the server has {ids}")
            model_id = self.settings.model
        elif ids:
            model_id = ids[0]
        else:
            raise BackendError(f"{self.name}: GET /v1/models listed no model and none is configured")
        self._model_id = model_id
        detail: dict[str, Any] = {"base_url": self.base_url, "probed": True, "models": ids}
        entry = next((m for m in models if m["id"] == model_id), {})
        if entry.get("max_model_len"):
            detail["max_model_len"] = entry["max_model_len"]

        caps = {Capability.GENERATE}
        label_mode: str | None = None
        k = self._max_logprobs
        if await self._probe_logprobs(1, retries):
            caps.add(Capability.LABEL_LOGPROBS)
            tokens = await self._probe_tokenize(retries)
            self._tokenize_ok = bool(tokens)
            if tokens and await self._probe_logprob_token_ids(tokens, retries):
                label_mode = LABEL_MODE_TOKEN_IDS
            else:
                label_mode = LABEL_MODE_TOP_K
                k = await self._probe_max_logprobs(retries)
        self._label_mode = label_mode
        self._max_logprobs = k
        detail.update(label_mode=label_mode, tokenize=self._tokenize_ok, max_logprobs=k)
        if Capability.LABEL_LOGPROBS in caps:
            embeds = await self._probe_prompt_embeds(retries)
            detail["prompt_embeds"] = embeds
            if embeds == "ok":
                caps.add(Capability.INPUT_EMBEDDINGS)
        self._detail = detail
        self._info = self._make_info(frozenset(caps))
        log.info("backend %s: model %s, capabilities %s, %s", self.name, model_id, sorted(caps), detail)

    async def _probe_prompt_embeds(self, retries: int) -> str:
        """'ok' when the server takes `prompt_embeds` and answers for them as for the same text; else why not.

        Needs `embedding_weights` and `/tokenize`. The text and the embedded text must get the same top token
        and log-prob: that also catches weights that are not the served model's."""
        if not self.settings.embedding_weights:
            return "off: no embedding_weights configured"
        if not self._tokenize_ok:
            return "off: the server has no /tokenize"
        from app.llm.embedding_weights import EmbeddingWeightsError

        try:
            embeds = await self._prompt_embeds(_PROBE_TEXT, None, probe=True, max_retries=retries)
        except (EmbeddingWeightsError, OSError, BackendError) as exc:
            return f"off: {exc}"
        k = min(5, self._max_logprobs)
        as_embeds = await self._probe_completion(self._label_body({"prompt_embeds": embeds}, k), retries)
        if as_embeds is None:
            return "off: the server refused prompt_embeds (vLLM needs --enable-prompt-embeds)"
        as_text = await self._probe_completion(self._label_body(_PROBE_TEXT, k), retries)
        try:
            top_embeds = _first_top_logprobs(as_embeds, self.name)
            top_text = _first_top_logprobs(as_text, self.name) if as_text else {}
        except BackendError:
            return "off: the prompt_embeds answer had no logprobs"
        shared = set(top_embeds) & set(top_text)
        same_top = bool(top_text) and max(top_embeds, key=top_embeds.get) == max(top_text, key=top_text.get)
        if not same_top or any(abs(top_embeds[t] - top_text[t]) > PROMPT_EMBEDS_TOLERANCE for t in shared):
            return (
                f"off: the server answers the embedded probe text differently ({top_embeds}) than the text itself "
                f"({top_text}); embedding_weights do not look like the served model's"
            )
        return "ok"

    async def _probe_completion(self, body: dict, retries: int) -> dict | None:
        """A probe completion's answer, or None when the server refuses it with a 4xx."""
        try:
            return await self._request("POST", f"{self.base_url}/completions", body, probe=True, max_retries=retries)
        except BackendHTTPError as exc:
            if exc.status >= 500:
                raise
            log.info("backend %s: probe %s refused: %s", self.name, sorted(body), exc.server_message)
            return None

    async def _probe_logprobs(self, k: int, retries: int) -> bool:
        data = await self._probe_completion(self._label_body("Hello", k), retries)
        if data is None:
            return False
        try:
            return bool(_first_top_logprobs(data, self.name))
        except BackendError:
            return False

    async def _probe_max_logprobs(self, retries: int) -> int:
        """The largest top-k the server grants, up to `max_logprobs` (vLLM: `--max-logprobs`)."""
        k = self._max_logprobs
        if k <= 1:
            return 1
        body = self._label_body("Hello", k)
        try:
            data = await self._request("POST", f"{self.base_url}/completions", body, probe=True, max_retries=retries)
        except BackendHTTPError as exc:
            if exc.status >= 500:
                raise
            match = _MAX_ALLOWED_RE.search(exc.server_message)
            granted = int(match.group(1)) if match else 0
            for candidate in (granted, 5):
                if 1 <= candidate < k and await self._probe_logprobs(candidate, retries):
                    return candidate
            return 1
        return k if _first_top_logprobs(data, self.name) else 1

    async def _probe_tokenize(self, retries: int) -> list[int]:
        try:
            return await self._tokenize(" yes no", probe=True, max_retries=retries)
        except BackendError as exc:
            log.info("backend %s: /tokenize unavailable: %s", self.name, exc)
            return []

    async def _probe_logprob_token_ids(self, tokens: list[int], retries: int) -> bool:
        """Does the server honour `logprob_token_ids`? A 400 says no; so does an answer that ignores it.

        Older vLLM accepts unknown fields silently, so the answer is checked: with `logprobs=1` and two
        named ids, an ignoring server returns only its top token, an honouring one both named ids.
        """
        wanted = sorted(set(tokens))[:2]
        body = self._label_body("Hello", 1)
        body["logprob_token_ids"] = wanted
        body["return_tokens_as_token_ids"] = True
        data = await self._probe_completion(body, retries)
        if data is None:
            return False
        try:
            returned = {_token_id_key(key) for key in _first_top_logprobs(data, self.name)}
        except BackendError:
            return False
        return all(token in returned for token in wanted)

    # ------------------------------------------------------------------ plumbing

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
        geometry = {"hidden_size": int(self._embeddings.shape[1])} if self._embeddings is not None else {}
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
            raise CapabilityMissing(f"backend {self.name!r} lacks capability {capability.value!r}")

    async def _fan_out(
        self,
        items: Sequence[Any],
        call: Callable[[Any], Awaitable[_T]],
        on_result: Callable[[int, Any], None] | None,
    ) -> list[_T]:
        """Run `call` on every item under the semaphore; slots are taken in item order.

        Tasks are created in order and `asyncio.Semaphore` queues waiters first come, first served, so
        request i always goes out before request i+1. After the first failure no further request is sent, but
        those already in flight finish and their answers reach `on_result` (cancelling them would throw away
        answers the server already computed, to be asked again); then the failure is raised. Cancelling the
        caller cancels everything at once.
        """
        results: list[Any] = [None] * len(items)
        failed = False

        async def one(i: int) -> None:
            nonlocal failed
            async with self._sem:
                if failed:
                    return
                try:
                    result = await call(items[i])
                except BaseException:
                    failed = True
                    raise
            results[i] = result
            if on_result is not None:
                on_result(i, result)

        tasks = [asyncio.create_task(one(i)) for i in range(len(items))]
        if not tasks:
            return []
        try:
            await asyncio.wait(tasks)
        finally:
            pending = [task for task in tasks if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        errors = [task.exception() for task in tasks if not task.cancelled()]
        for error in errors:
            if error is not None:
                raise error
        return results

    async def _request(
        self,
        method: str,
        url: str,
        body: dict | None = None,
        *,
        probe: bool = False,
        max_retries: int | None = None,
    ) -> Any:
        retries = self.settings.max_retries if max_retries is None else max_retries
        headers = {PROBE_HEADER: "1"} if probe else None
        path = url[len(self.root_url) :] or url
        attempt = 0
        gate = None if probe else SEND_GATE.get()
        while True:
            retry_after: float | None = None
            status: int | None = None
            server_message = ""
            if gate is not None:
                gate()  # raises SendRefused: this job may no longer call the model
            try:
                response = await self._client.request(method, url, json=body, headers=headers)
            except _RETRYABLE_TRANSPORT_ERRORS as exc:
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            except httpx.HTTPError as exc:
                raise BackendError(f"{self.name}: {method} {path} failed: {type(exc).__name__}: {exc}") from exc
            else:
                status = response.status_code
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError:
                        reason = f"HTTP {status} with a body that is not JSON"
                        status = None
                else:
                    server_message = _server_message(response)
                    reason = f"HTTP {status}: {server_message}"
                    if status not in _RETRYABLE_STATUSES and status < 500:
                        raise BackendHTTPError(
                            f"{self.name}: {method} {path} -> {reason}", status=status, server_message=server_message
                        )
                    retry_after = _retry_after(response.headers.get("retry-after"))
            if attempt >= retries:
                message = f"{self.name}: {method} {path} failed after {attempt + 1} attempt(s): {reason}"
                if status is not None:
                    raise BackendHTTPError(message, status=status, server_message=server_message)
                raise BackendUnavailable(message)
            if retry_after is not None:
                delay = min(retry_after, MAX_RETRY_AFTER_S)
            else:
                delay = self._random.uniform(0, min(MAX_BACKOFF_S, self.settings.retry_base_delay_s * 2**attempt))
            attempt += 1
            log.warning(
                "backend %s: %s %s attempt %d failed (%s); retrying in %.2fs",
                self.name,
                method,
                path,
                attempt,
                reason,
                delay,
            )
            await asyncio.sleep(delay)


# ---------------------------------------------------------------------- response helpers


def _choices(data: Any, name: str) -> list[dict]:
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise BackendError(f"{name}: the server answered without choices")
    return sorted((c for c in choices if isinstance(c, dict)), key=lambda c: c.get("index", 0))


def _first_top_logprobs(data: Any, name: str) -> dict[str, float]:
    """`choices[0].logprobs.top_logprobs[0]` (legacy completions shape); {} where the server sent none."""
    choice = _choices(data, name)[0]
    logprobs = choice.get("logprobs") or {}
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not top:
        return {}
    first = top[0]
    return first if isinstance(first, dict) else {}


def _token_id_key(key: str) -> int | None:
    """vLLM's `return_tokens_as_token_ids` keys read `token_id:123`."""
    if key.startswith("token_id:"):
        try:
            return int(key[len("token_id:") :])
        except ValueError:
            return None
    return None


def _server_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])
    return str(data)[:500]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _encode_tensor(array: np.ndarray) -> str:
    import torch

    buffer = io.BytesIO()
    torch.save(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _estimate_tokens(text: str) -> int:
    """Used only when a server omits `usage`: ~4 characters a token."""
    return math.ceil(len(text) / 4) if text else 0
