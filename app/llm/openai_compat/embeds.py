"""Soft prompts over HTTP: whole prompts sent as vLLM `prompt_embeds`.

The prompt's tokens (the server's `/tokenize`) are embedded with the served model's input matrix (read from
`embedding_weights`); an input-layer soft prompt's vectors go after any leading special tokens, as the local
runner places them; an additive soft prompt instead adds its vectors to the rows of its placeholder tokens.
"""

from __future__ import annotations

import asyncio
import base64
import pickle
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
    """base64 of what `torch.save(tensor, _use_new_zipfile_serialization=False)` writes for the (rows, hidden)
    float32 tensor `array`, which vLLM reads with `torch.load(..., weights_only=True)`. Written here without torch,
    which a worker would otherwise import for this alone (about 180 MB resident: BBT over HTTP needs no torch
    otherwise); a test checks the bytes against torch.save's, byte for byte but the storage's key."""
    return base64.b64encode(torch_save_bytes(array)).decode("ascii")


# torch's legacy (non-zip) serialization: five protocol-2 pickles, then each storage's element count (int64) and
# raw bytes. The first three are plain values (magic number, protocol, sizes), the fourth rebuilds the tensor from a
# persistent storage id, the fifth lists the storages' keys.
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_TORCH_SYS_INFO = {
    "protocol_version": _TORCH_PROTOCOL,
    "little_endian": True,
    "type_sizes": {"short": 2, "int": 4, "long": 4},
}
_TORCH_HEADER = b"".join(pickle.dumps(v, protocol=2) for v in (_TORCH_MAGIC, _TORCH_PROTOCOL, _TORCH_SYS_INFO))


def torch_save_bytes(array: np.ndarray, key: str = "0") -> bytes:
    """The bytes `torch.save` (legacy format) writes for a contiguous 2-D float32 tensor of `array`'s values, its
    storage named `key` (torch names it by its address). The tensor's pickle is written opcode by opcode, as torch's
    pickler does (protocol 2, memoised with BINPUT 0-11), since pickling references to torch's classes by name
    needs torch importable; ints and the storage-key list go through `pickle` itself, so they encode as torch's do."""
    data = np.ascontiguousarray(array, dtype="<f4")
    if data.ndim != 2:
        raise ValueError(f"a 2-D (rows, hidden) array is expected, not {data.ndim}-D")
    rows, hidden = data.shape

    def put(index: int) -> bytes:
        return b"q" + bytes([index])  # BINPUT

    def text(value: str) -> bytes:
        encoded = value.encode()
        return b"X" + len(encoded).to_bytes(4, "little") + encoded  # BINUNICODE

    def number(value: int) -> bytes:
        return pickle.dumps(value, protocol=2)[2:-1]  # the int's opcode: no PROTO, no STOP (ints are not memoised)

    tensor = b"".join(
        [
            b"\x80\x02",  # PROTO 2
            b"ctorch._utils\n_rebuild_tensor_v2\n" + put(0),
            b"(",  # MARK: the arguments
            b"(" + text("storage") + put(1),  # MARK: the persistent id (storage, type, key, location, numel, None)
            b"ctorch\nFloatStorage\n" + put(2),
            text(key) + put(3),
            text("cpu") + put(4),
            number(data.size),
            b"Nt" + put(5) + b"Q",  # None, TUPLE, BINPERSID
            number(0),  # storage offset
            number(rows) + number(hidden) + b"\x86" + put(6),  # size (TUPLE2)
            number(hidden) + number(1) + b"\x86" + put(7),  # stride
            b"\x89",  # requires_grad False
            b"ccollections\nOrderedDict\n" + put(8) + b")R" + put(9),  # backward hooks: OrderedDict()
            b"t" + put(10) + b"R" + put(11) + b".",
        ]
    )
    keys = pickle.dumps([key], protocol=2)
    return b"".join([_TORCH_HEADER, tensor, keys, data.size.to_bytes(8, "little"), data.tobytes()])
