"""Soft prompts over HTTP: whole prompts sent as vLLM `prompt_embeds`.

The prompt's tokens (the server's `/tokenize`) are embedded with the served model's input matrix (read from
`embedding_weights`); an input-layer soft prompt's vectors go after any leading special tokens, as the local
runner places them; an additive soft prompt instead adds its vectors to the rows of its placeholder tokens.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from app.llm.port import (
    BackendError,
    ContinuousPrefix,
    PrefixKind,
    anchor_bounds,
    leading_special_ids,
    placeholder_span,
    soft_prompt_position,
)
from app.settings import BackendSettings

# Token ids of prompts sent as embeddings, kept per text (BBT re-sends each training example per candidate).
TOKEN_ID_CACHE_SIZE = 4096

# tokenize(text, add_special_tokens=..., probe=..., max_retries=...) -> ids
Tokenize = Callable[..., Awaitable[list[int]]]


class PromptEmbedder:
    def __init__(self, name: str, settings: BackendSettings, tokenize: Tokenize) -> None:
        self.name = name
        self.settings = settings
        self._tokenize = tokenize
        self.matrix: Any = None  # EmbeddingRows (vocab, hidden), opened on first use
        self._lock = asyncio.Lock()
        self._special_prefix: list[int] | None = None
        self._prompt_ids: OrderedDict[str, list[int]] = OrderedDict()

    async def embedding_matrix(self) -> Any:
        """The served model's (vocab, hidden) input embeddings, read once from `embedding_weights`."""
        if self.matrix is None:
            async with self._lock:
                if self.matrix is None:
                    if not self.settings.embedding_weights:
                        raise BackendError(
                            f"{self.name}: set embedding_weights (the served model's safetensors) to send soft prompts"
                        )
                    from app.llm.embedding_weights import open_input_embeddings

                    self.matrix = await asyncio.to_thread(
                        open_input_embeddings, self.settings.embedding_weights, self.settings.embedding_tensor
                    )
        return self.matrix

    async def token_ids(self, prompt: str, **request: Any) -> list[int]:
        """The prompt's ids as a completion would tokenize it (special tokens included), cached per text."""
        if prompt in self._prompt_ids:
            self._prompt_ids.move_to_end(prompt)
            return self._prompt_ids[prompt]
        ids = await self._tokenize(prompt, add_special_tokens=True, **request)
        self._prompt_ids[prompt] = ids
        if len(self._prompt_ids) > TOKEN_ID_CACHE_SIZE:
            self._prompt_ids.popitem(last=False)
        return ids

    async def leading_special(self, **request: Any) -> list[int]:
        """Ids the tokenizer puts before every prompt (a BOS, for some models; none for SmolLM2)."""
        if self._special_prefix is None:
            with_special = await self._tokenize("Hello", add_special_tokens=True, **request)
            plain = await self._tokenize("Hello", **request)
            self._special_prefix = leading_special_ids(with_special, plain)
        return self._special_prefix

    async def prompt_embeds(self, prompt: str, prefix: ContinuousPrefix | None, **request: Any) -> str:
        """base64 of a torch-saved (tokens + prefix, hidden) float32 tensor, as vLLM reads `prompt_embeds`.
        `request`: probe / max_retries for the tokenize calls."""
        (encoded,) = await self.prompt_embeds_many([(prompt, prefix)], **request)
        return encoded

    async def prompt_embeds_many(self, items: list[tuple[str, ContinuousPrefix | None]], **request: Any) -> list[str]:
        """`prompt_embeds` for several prompts, the tensors encoded in one worker-thread hop (one request's
        prompts: serialising them one hop each cost more CPU than the request itself)."""
        arrays = [await self._rows(prompt, prefix, **request) for prompt, prefix in items]
        return await asyncio.to_thread(lambda: [encode_tensor(array) for array in arrays])

    async def _rows(self, prompt: str, prefix: ContinuousPrefix | None, **request: Any) -> np.ndarray:
        """The (tokens + prefix, hidden) rows that stand for `prompt` behind `prefix`."""
        matrix = await self.embedding_matrix()
        special = await self.leading_special(**request)
        ids = await self.token_ids(prompt, **request)
        if ids and max(ids) >= matrix.shape[0]:
            raise BackendError(
                f"{self.name}: token id {max(ids)} is outside the {matrix.shape[0]}-row embedding_weights: "
                "they are not the served model's"
            )
        if prefix is not None and prefix.vectors.shape[-1] != matrix.shape[1]:
            raise BackendError(
                f"{self.name}: soft prompt of width {prefix.vectors.shape[-1]} does not fit this model "
                f"(hidden size {matrix.shape[1]})"
            )
        if prefix is not None and prefix.kind == PrefixKind.INPUT_ADD:
            # The additive form: the prompt's own rows, the vectors added to its placeholder tokens' rows.
            start, end = anchor_bounds(prompt, prefix.anchor)
            before = await self.token_ids(prompt[:start], **request)
            through = await self.token_ids(prompt[:end], **request)
            first, last = placeholder_span(ids, before, through, prefix.rows)
            rows = matrix[ids].astype(np.float32, copy=True)
            rows[first:last] += prefix.vectors[: last - first]
            return rows
        head = soft_prompt_position(ids, special)
        parts = [matrix[ids[:head]]]
        if prefix is not None:
            parts.append(prefix.vectors)
        parts.append(matrix[ids[head:]])
        return np.concatenate(parts, axis=0)


def encode_tensor(array: np.ndarray) -> str:
    """base64 of `torch.save(tensor)`, which vLLM reads with `torch.load(..., weights_only=True)`. The legacy
    (non-zip) format: the same bytes for the tensor, half the CPU to write, and `torch.load` reads both."""
    import torch

    buffer = io.BytesIO()
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    torch.save(tensor, buffer, _use_new_zipfile_serialization=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
