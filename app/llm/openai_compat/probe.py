"""Capability probe of an OpenAI-compatible server, run once by `OpenAICompatBackend.start()`.

It finds the model id, whether one-token completions return log-probs (label scoring), whether the server honours
`logprob_token_ids` (else the top-k it grants), whether `/tokenize` exists, whether one request may carry a list
of prompts, whether `prompt_embeds` answers match the text they embed (soft prompts), and whether `/v1/embeddings`
answers for the model (`features`).

The `prompt_embeds` check reads the served model's embedding weights. A process that sends no soft prompt of its
own (the API: it validates and queues jobs, workers run them) defers it (`defer_prompt_embeds`): `input_embeddings`
is granted on the configuration alone (`embedding_weights` set, `/tokenize` served) and the check runs only before
the first soft prompt that process sends (a soft-prompt `predict`), so the weights are never opened otherwise.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from app.llm.openai_compat.responses import choices_of, embeddings_of, first_top_logprobs, token_id_key
from app.llm.openai_compat.transport import BackendHTTPError
from app.llm.port import BackendError, Capability

log = logging.getLogger(__name__)

# Probes at start-up give up sooner than job calls, so a dead backend does not hold up a start.
PROBE_MAX_RETRIES = 2
LABEL_MODE_TOKEN_IDS = "token_ids"  # logprob_token_ids + return_tokens_as_token_ids
LABEL_MODE_TOP_K = "top_k"  # logprobs=k, keys are decoded token strings
# The probe's prompt_embeds answer must match its text answer this closely, or the embedding weights are not
# the served model's (bf16 serving moves a log-prob by a few hundredths).
PROMPT_EMBEDS_TOLERANCE = 0.1
# A text whose next token a model predicts with some confidence, so wrong embeddings show.
_PROBE_TEXT = "The capital of France is the city of"
# The verdict of a process that defers the check (see the module docstring).
PROMPT_EMBEDS_NOT_PROBED = (
    "not probed in the API: granted on the configured embedding_weights, which this process reads only before "
    "the first soft prompt it sends; workers probe at start"
)
_MAX_ALLOWED_RE = re.compile(r"max(?:imum)?[ _]?(?:allowed|logprobs)?\D{0,16}?(\d+)", re.IGNORECASE)


class CapabilityProbe:
    """Mixed into `OpenAICompatBackend`: the probe steps, each one request or a few."""

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
            self._prompts_per_request = (
                self.settings.prompts_per_request if await self._probe_prompt_lists(retries) else 1
            )
            detail["prompts_per_request"] = self._prompts_per_request
            if self._defer_prompt_embeds:
                embeds = self._prompt_embeds_configured()
                self._prompt_embeds_pending = embeds == PROMPT_EMBEDS_NOT_PROBED
            else:
                embeds = await self._probe_prompt_embeds(retries)
            detail["prompt_embeds"] = embeds
            if embeds in ("ok", PROMPT_EMBEDS_NOT_PROBED):
                caps.add(Capability.INPUT_EMBEDDINGS)
        embeddings = await self._probe_embeddings(retries)
        detail["embeddings"] = embeddings
        if embeddings.startswith("ok"):
            caps.add(Capability.FEATURES)
        self._detail = detail
        self._info = self._make_info(frozenset(caps))
        log.info("backend %s: model %s, capabilities %s, %s", self.name, model_id, sorted(caps), detail)

    def _prompt_embeds_configured(self) -> str:
        """The deferred verdict: what the configuration and the probe so far say, the weights left unread."""
        if not self.settings.embedding_weights:
            return "off: no embedding_weights configured"
        if not self._tokenize_ok:
            return "off: the server has no /tokenize"
        return PROMPT_EMBEDS_NOT_PROBED

    async def _confirm_prompt_embeds(self) -> None:
        """Where the check was deferred: run it before this process's first soft prompt, once, and keep
        `input_embeddings` only if it passes (the verdict replaces the deferred one in `detail`)."""
        if not self._prompt_embeds_pending:
            return
        async with self._prompt_embeds_lock:
            if not self._prompt_embeds_pending:
                return
            verdict = await self._probe_prompt_embeds(min(self.settings.max_retries, PROBE_MAX_RETRIES))
            self._detail["prompt_embeds"] = verdict
            caps = set(self._info.capabilities)
            if verdict != "ok":
                caps.discard(Capability.INPUT_EMBEDDINGS)
            self._info = self._make_info(frozenset(caps))
            self._prompt_embeds_pending = False
            log.info("backend %s: prompt_embeds checked before the first soft prompt: %s", self.name, verdict)

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
            embeds = await self._embedder.prompt_embeds(_PROBE_TEXT, None, probe=True, max_retries=retries)
        except (EmbeddingWeightsError, OSError, BackendError) as exc:
            return f"off: {exc}"
        k = min(5, self._max_logprobs)
        as_embeds = await self._probe_completion(self._label_body({"prompt_embeds": embeds}, k), retries)
        if as_embeds is None:
            return "off: the server refused prompt_embeds (vLLM needs --enable-prompt-embeds)"
        as_text = await self._probe_completion(self._label_body(_PROBE_TEXT, k), retries)
        try:
            top_embeds = first_top_logprobs(choices_of(as_embeds, self.name)[0])
            top_text = first_top_logprobs(choices_of(as_text, self.name)[0]) if as_text else {}
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

    async def _probe_embeddings(self, retries: int) -> str:
        """'ok: N dimensions' when `/v1/embeddings` answers two texts with one vector each (a server that serves no
        embeddings for this model refuses with a 4xx or 501); else why not."""
        body = self._embeddings_body(["Hello", "The sky is"])
        try:
            data = await self._request("POST", f"{self.base_url}/embeddings", body, probe=True, max_retries=retries)
        except BackendHTTPError as exc:
            if exc.status >= 500 and exc.status != 501:
                raise
            return f"off: the server refused /v1/embeddings ({exc.status}: {exc.server_message[:200]})"
        try:
            vectors = embeddings_of(data, 2, self.name)
        except BackendError as exc:
            return f"off: {exc}"
        return f"ok: {len(vectors[0])} dimensions"

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
            return bool(first_top_logprobs(choices_of(data, self.name)[0]))
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
        return k if first_top_logprobs(choices_of(data, self.name)[0]) else 1

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
            returned = {token_id_key(key) for key in first_top_logprobs(choices_of(data, self.name)[0])}
        except BackendError:
            return False
        return all(token in returned for token in wanted)

    async def _probe_prompt_lists(self, retries: int) -> bool:
        """Does one `/v1/completions` request take a list of prompts and answer each (vLLM, OpenAI: yes)?"""
        if self.settings.prompts_per_request <= 1:
            return False
        prompts = ["Hello", "The sky is"]
        data = await self._probe_completion(self._label_body(prompts, 1), retries)
        if data is None:
            return False
        try:
            choices = choices_of(data, self.name)
        except BackendError:
            return False
        return [c.get("index") for c in choices] == [0, 1] and all(first_top_logprobs(c) for c in choices)
