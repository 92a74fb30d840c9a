"""A job's view of a backend: evaluation cache in front, usage counted, budget enforced.

Optimizers and the evaluator only ever see a `MeteredLLM`; it has the same `generate` /
`label_logprobs` calls as a backend, so the algorithms cannot bypass the cache or the budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Protocol

from app.cache.flights import Flights
from app.cache.lru import LRU
from app.cache.store import CacheStore
from app.llm.breaker import CircuitBreaker
from app.llm.port import (
    SEND_GATE,
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
    LLMBackend,
    PrefixKind,
    SendRefused,
)
from app.metrics import LLM_CACHE_HITS, LLM_ERRORS, llm_answered
from app.usage import Budget, TokenPrice, Usage


# Awaited before every batch: returns once this job may call the model (e.g. its lease is known to be valid),
# raises (e.g. LeaseLost) when it never may again. Its `gate` (sync) is checked before each single request: it
# raises SendRefused when the lease is not known valid right now, and the batch's unanswered rest waits for the
# guard again.
class SendGuard(Protocol):
    async def __call__(self) -> None: ...

    def gate(self) -> None: ...


# Told about backend outages the job waits through: ("backend_down" | "backend_up", details).
OutageNotice = Callable[[str, dict], None]

PREFIX_CAPABILITY = {
    PrefixKind.INPUT: Capability.INPUT_EMBEDDINGS,
    PrefixKind.INPUT_ADD: Capability.INPUT_EMBEDDINGS,
    PrefixKind.DEEP: Capability.DEEP_PROMPT,
    PrefixKind.DEEP_ADD: Capability.DEEP_PROMPT,
}


def cache_key(
    model_id: str, kind: str, request: GenerationRequest | LabelScoreRequest | FeatureRequest, scope: str | None = None
) -> str:
    """`scope`: whose cache (a tenant); None: the cache shared by everyone (keys as they always were)."""
    parts: list = [model_id, kind, request.cache_payload()]
    if scope is not None:
        parts.append({"scope": scope})
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class MeteredLLM:
    def __init__(
        self,
        backend: LLMBackend,
        *,
        usage: Usage,
        budget: Budget,
        store: CacheStore | None,
        lru: LRU | None = None,
        breaker: CircuitBreaker | None = None,
        guard: SendGuard | None = None,
        notice: OutageNotice | None = None,
        cache_scope: str | None = None,
        flights: Flights | None = None,
        price: TokenPrice | None = None,
    ) -> None:
        """`cache_scope`: answers are cached (and found) only within this scope, e.g. the job's tenant, so one
        tenant never learns what another evaluated nor gets work another paid for. `flights`: the process's
        requests in flight, shared by its jobs, so two jobs missing the cache on one request send it once."""
        self.backend = backend
        self.price = price or TokenPrice()
        self.cache_scope = cache_scope
        self.flights = flights
        self.usage = usage
        self.budget = budget
        self.store = store
        self.lru = lru if lru is not None else LRU(50_000)
        self.breaker = breaker
        self.guard = guard
        self.notice = notice
        self.metric_backend = str(getattr(backend, "name", None) or "unknown")  # the `backend` label

    @property
    def info(self) -> BackendInfo:
        return self.backend.info

    def require(self, capability: Capability) -> None:
        if capability not in self.backend.info.capabilities:
            raise CapabilityMissing(f"backend {self.backend.name!r} lacks capability {capability.value!r}")

    # White-box facts for continuous prompts (BBT/BBTv2). Not LLM calls: nothing is metered.
    async def model_geometry(self) -> dict:
        """hidden_size, num_layers, num_kv_heads, head_dim of the backend's model (empty if unknown)."""
        await self.backend.start()
        return dict(self.backend.info.geometry)

    async def embedding_std(self) -> float:
        self.require(Capability.INPUT_EMBEDDINGS)
        return await self.backend.embedding_std()  # type: ignore[attr-defined]

    async def kv_statistics(self, prompts: list[str]) -> list[tuple[float, float]]:
        self.require(Capability.DEEP_PROMPT)
        return await self.backend.kv_statistics(prompts)  # type: ignore[attr-defined]

    async def hidden_statistics(self, prompts: list[str]) -> list[float]:
        self.require(Capability.DEEP_PROMPT)
        return await self.backend.hidden_statistics(prompts)  # type: ignore[attr-defined]

    async def generate(
        self, requests: Sequence[GenerationRequest], on_result: Callable[[int, Generation], None] | None = None
    ) -> list[Generation]:
        """`on_result(i, generation)` is called as soon as request i's answer is known (a cache hit at once), so a
        caller can start on early answers while later ones are still being generated."""
        self.require(Capability.GENERATE)
        values = await self._run(
            "generate",
            requests,
            lambda r: (self.backend.count_tokens_upper_bound(r.prompt + (r.system or "")), r.max_tokens * r.n),
            self._call_generate,
            None if on_result is None else (lambda i, value: on_result(i, Generation(**value))),
        )
        return [Generation(**v) for v in values]

    async def label_logprobs(self, requests: Sequence[LabelScoreRequest]) -> list[LabelScores]:
        self.require(Capability.LABEL_LOGPROBS)
        for kind in {r.prefix.kind for r in requests if r.prefix is not None}:
            self.require(PREFIX_CAPABILITY[kind])
        values = await self._run(
            "label_logprobs",
            requests,
            lambda r: (self.backend.count_tokens_upper_bound(r.prompt) + (r.prefix.length if r.prefix else 0), 1),
            self._call_label_logprobs,
        )
        return [LabelScores(**v) for v in values]

    async def features(self, requests: Sequence[FeatureRequest]) -> list[Features]:
        """Feature vectors of texts (needs `features`): cached, charged and budgeted like label scores, one call a
        text, its tokens as prompt tokens."""
        self.require(Capability.FEATURES)
        values = await self._run(
            "features",
            requests,
            lambda r: (self.backend.count_tokens_upper_bound(r.text), 0),
            self._call_features,
        )
        return [Features(**v) for v in values]

    async def _call_generate(self, requests: list, on_result) -> list[dict]:
        return [asdict(g) for g in await self.backend.generate(requests, on_result=on_result)]

    async def _call_label_logprobs(self, requests: list, on_result) -> list[dict]:
        return [asdict(s) for s in await self.backend.label_logprobs(requests, on_result=on_result)]

    async def _call_features(self, requests: list, on_result) -> list[dict]:
        return [asdict(f) for f in await self.backend.features(requests, on_result=on_result)]  # type: ignore[attr-defined]

    async def _run(self, kind, requests, token_bound, call, on_value=None) -> list[dict]:
        token = SEND_GATE.set(self.guard.gate if self.guard is not None else None)
        try:
            return await self._run_gated(kind, requests, token_bound, call, on_value)
        finally:
            SEND_GATE.reset(token)

    async def _run_gated(self, kind, requests, token_bound, call, on_value) -> list[dict]:
        model_id = self.backend.info.model_id
        results: list[dict | None] = [None] * len(requests)
        scope = self.cache_scope
        keys: list[str | None] = [cache_key(model_id, kind, r, scope) if r.deterministic else None for r in requests]
        # 1. in-process LRU, 2. durable store, 3. the model. Duplicates inside one batch are sent once.
        durable_lookup = []
        for i, key in enumerate(keys):
            if key is None:
                continue
            hit = self.lru.get(key)
            if hit is not None:
                results[i] = hit
            else:
                durable_lookup.append(key)
        if durable_lookup and self.store is not None:
            found = await self.store.get_many(sorted(set(durable_lookup)))
            for i, key in enumerate(keys):
                if results[i] is None and key in found:
                    results[i] = found[key]
                    self.lru.put(key, found[key])

        pending: dict[str, list[int]] = {}
        to_send: list[int] = []
        hits = 0
        for i, key in enumerate(keys):
            if results[i] is not None:
                hits += 1
            elif key is not None and key in pending:
                pending[key].append(i)
                hits += 1
            else:
                if key is not None:
                    pending[key] = [i]
                to_send.append(i)
        if hits:
            self.usage.cache_hits += hits
            LLM_CACHE_HITS.labels(self.metric_backend).inc(hits)
            if self.store is not None:
                self.store.submit(None, model_id, {}, Usage(cache_hits=hits))
            if on_value is not None:
                for i, value in enumerate(results):
                    if value is not None:
                        on_value(i, value)

        def deliver(i: int, value: dict) -> None:
            """Request i (and its duplicates in this batch) answered with `value`."""
            key = keys[i]
            for index in pending[key] if key is not None else [i]:
                results[index] = value
                if on_value is not None:
                    on_value(index, value)

        # Requests another job of this process is sending right now: wait for its answer instead (single-flight).
        borrowed: dict[int, asyncio.Future] = {}
        keyed = [keys[i] for i in to_send if keys[i] is not None]
        if self.flights is not None and keyed:
            taken = await self.flights.claim(keyed)
            borrowed = {i: taken[keys[i]] for i in to_send if keys[i] in taken}
            to_send = [i for i in to_send if keys[i] not in taken]
        if to_send:
            await self._send(requests, keys, to_send, results, token_bound, call, deliver, model_id)
        if borrowed:
            unanswered = []
            for i, future in borrowed.items():
                value = await future
                if value is None:
                    unanswered.append(i)
                    continue
                self.usage.cache_hits += 1  # another job paid for it
                LLM_CACHE_HITS.labels(self.metric_backend).inc()
                if self.store is not None:
                    self.store.submit(None, model_id, {}, Usage(cache_hits=1))
                deliver(i, value)
            if unanswered:  # its sender gave up: ask (or find in the cache) ourselves
                values = await self._run_gated(kind, [requests[i] for i in unanswered], token_bound, call, None)
                for i, value in zip(unanswered, values, strict=True):
                    deliver(i, value)
        return results  # type: ignore[return-value]

    async def _send(self, requests, keys, to_send, results, token_bound, call, deliver, model_id) -> None:
        """Send `to_send` (indices into `requests`) under the budget, through the breaker and the send guard."""
        # `token_bound(request)`: upper bounds of its (prompt, completion) tokens.
        bounds = [token_bound(requests[i]) for i in to_send]
        prompt_bound, completion_bound = sum(b[0] for b in bounds), sum(b[1] for b in bounds)
        reserve_tokens = prompt_bound + completion_bound
        reserve_cost = self.price.cost(prompt_bound, completion_bound)
        try:
            self.budget.reserve(self.usage, len(to_send), reserve_tokens, reserve_cost)
        except BaseException:
            self._abandon(keys, to_send, results)
            raise

        sent: list[int] = to_send

        def on_result(j: int, answer) -> None:
            value = _as_cacheable(answer)
            i = sent[j]
            key = keys[i]
            delta = Usage(
                llm_calls=1,
                prompt_tokens=value["prompt_tokens"],
                completion_tokens=value["completion_tokens"],
                cost=self.price.cost(value["prompt_tokens"], value["completion_tokens"]),
            )
            # Charged once per answered request, whatever retries it took inside the backend.
            self.usage.add(delta)
            llm_answered(self.metric_backend, delta.prompt_tokens, delta.completion_tokens)
            if key is not None:
                self.lru.put(key, value)
                if self.flights is not None:
                    self.flights.answered(key, value)
            if self.store is not None:
                self.store.submit(key, model_id, value, delta)
            deliver(i, value)

        try:
            while True:
                await self._before_send()
                try:
                    await call([requests[i] for i in sent], on_result)
                    break
                except SendRefused:
                    pass  # the guard decides, before the rest is sent
                except BackendError as exc:
                    LLM_ERRORS.labels(self.metric_backend, "transient" if exc.transient else "permanent").inc()
                    if not exc.transient or self.breaker is None:
                        raise
                    # Wait for the backend (breaker), then send again only what was not answered.
                    self.breaker.trip(exc)
                sent = [i for i in sent if results[i] is None]
                if not sent:
                    break
        finally:
            self.budget.release(len(to_send), reserve_tokens, reserve_cost)
            self._abandon(keys, to_send, results)
        # Answers are written (and charged) by the store in the background; the engine waits for them before each
        # checkpoint (`flush`), not here, so the next batch is not held up by a database round trip.
        missing = [i for i in to_send if results[i] is None]
        if missing:
            raise RuntimeError(f"backend {self.backend.name!r} did not report {len(missing)} results")

    def _abandon(self, keys, indices, results) -> None:
        """Whoever waits on a request this job will not answer after all sends it themselves."""
        if self.flights is not None:
            for i in indices:
                if results[i] is None and keys[i] is not None:
                    self.flights.abandoned(keys[i])

    async def _before_send(self) -> None:
        if self.breaker is not None and self.breaker.is_open:
            name, started = self.backend.name, time.monotonic()
            if self.notice is not None:
                self.notice("backend_down", {"backend": name, "error": self.breaker.last_error})
            await self.breaker.wait_closed()
            if self.notice is not None:
                self.notice("backend_up", {"backend": name, "waited_s": round(time.monotonic() - started, 1)})
        if self.guard is not None:
            await self.guard()

    async def flush(self) -> None:
        """Return once every answer so far is stored and charged."""
        if self.store is not None:
            await self.store.flush()

    # Derived, model-specific results (ClaPS's clustered vocabulary). Not LLM calls: nothing is metered.
    async def token_embeddings(self) -> tuple[list[str], list[str], object]:
        """The backend's vocabulary by token id: each token's raw piece (`Ġgreat`), its decoded text (` great`),
        and the input embedding matrix (float32 numpy, vocab x hidden). Needs `token_embeddings`."""
        import asyncio

        self.require(Capability.TOKEN_EMBEDDINGS)
        matrix = await self.backend.token_embedding_matrix()  # type: ignore[attr-defined]
        tokenizer = self.backend.tokenizer()  # type: ignore[attr-defined]

        def decode() -> tuple[list[str], list[str]]:
            ids = list(range(min(len(tokenizer), matrix.shape[0])))
            pieces = tokenizer.convert_ids_to_tokens(ids)
            texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
            return [p if isinstance(p, str) else "" for p in pieces], list(texts)

        pieces, texts = await asyncio.to_thread(decode)
        return pieces, texts, matrix

    async def memoize(self, kind: str, params: dict, compute) -> dict:
        """A JSON-serialisable result of `await compute()` kept in the evaluation cache (LRU, then durable store)
        under (backend model id, kind, params), so later jobs on the same model and settings re-use it."""
        model_id = self.backend.info.model_id
        payload = json.dumps([model_id, kind, params], sort_keys=True, ensure_ascii=False)
        key = hashlib.sha256(payload.encode()).hexdigest()
        value = self.lru.get(key)
        if value is None and self.store is not None:
            value = (await self.store.get_many([key])).get(key)
        if value is None:
            value = await compute()
            if self.store is not None:
                self.store.submit(key, model_id, value, Usage())
                await self.store.flush()
        self.lru.put(key, value)
        return value


def _as_cacheable(answer: Generation | LabelScores | Features) -> dict:
    value = asdict(answer)
    if "logprobs" in value:
        # JSON has no -inf; keep a finite floor so cached and fresh answers compare equal.
        value["logprobs"] = [lp if math.isfinite(lp) else -1e9 for lp in value["logprobs"]]
    return value
