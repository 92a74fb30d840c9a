"""The input-embedding matrix of a model served elsewhere, read from its safetensors weights.

An HTTP backend that takes `prompt_embeds` (vLLM `--enable-prompt-embeds`) has to be sent the embeddings of the
whole prompt, text included, so the client needs the served model's embedding matrix. It is read once from the
same weights the server loads (a `.safetensors` file, a model directory of them, or the server's Hugging Face
cache entry `hub/models--Org--Name`); nothing is downloaded. The tensor is memory-mapped in the file's own dtype and
rows are converted to float32 only as a prompt needs them, so a process holds the pages it touched, not the matrix
(which as float32 would be 74 MB for SmolLM2-135M and 2.2 GB for a 7B model with a 152k vocabulary, per process).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# Where common architectures keep the input embeddings (Llama/Mistral/Qwen/SmolLM, GPT-2, BERT-likes, Falcon).
EMBEDDING_TENSOR_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)


class EmbeddingWeightsError(ValueError):
    pass


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        # A Hugging Face cache entry (hub/models--Org--Name), as vLLM leaves it: its newest snapshot.
        snapshots = sorted((path / "snapshots").glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
        for snapshot in snapshots:
            files = sorted(snapshot.glob("*.safetensors"))
            if files:
                return files
    raise EmbeddingWeightsError(
        f"{path}: not a .safetensors file, a directory holding some, or a Hugging Face cache entry with a snapshot"
    )


# safetensors dtypes as stored; bfloat16 is read as raw 16-bit words and widened to float32 by hand (numpy has no
# bfloat16).
_STORED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
# Rows converted at a time when a whole-matrix statistic is computed.
_CHUNK_ROWS = 8192


class EmbeddingRows:
    """A (vocab, hidden) embedding tensor memory-mapped from a safetensors file; `rows[ids]` gives float32 rows."""

    def __init__(self, file: Path, name: str, dtype: str, shape: tuple[int, int], offset: int) -> None:
        if dtype not in _STORED_DTYPES:
            raise EmbeddingWeightsError(f"{file}: tensor {name!r} has dtype {dtype}; supported: {list(_STORED_DTYPES)}")
        if len(shape) != 2:
            raise EmbeddingWeightsError(f"{file}: tensor {name!r} has shape {tuple(shape)}, not 2-D")
        self.file, self.name, self.dtype = file, name, dtype
        self.shape = (int(shape[0]), int(shape[1]))
        self._stored = np.memmap(file, dtype=_STORED_DTYPES[dtype], mode="r", offset=offset, shape=self.shape)
        self._std: float | None = None

    def _widen(self, stored: np.ndarray) -> np.ndarray:
        if self.dtype == "BF16":
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)

    def __getitem__(self, ids) -> np.ndarray:
        return self._widen(self._stored[np.asarray(ids, dtype=np.int64)])

    def std(self) -> float:
        """The standard deviation of every entry (BBT's projection scale), computed in chunks, once."""
        if self._std is None:
            count, total, squares = 0, 0.0, 0.0
            for start in range(0, self.shape[0], _CHUNK_ROWS):
                chunk = self._widen(self._stored[start : start + _CHUNK_ROWS]).astype(np.float64)
                count += chunk.size
                total += float(chunk.sum())
                squares += float(np.square(chunk).sum())
            mean = total / count
            self._std = float(np.sqrt(max(0.0, squares / count - mean * mean)))
        return self._std


def _header(file: Path) -> tuple[dict, int]:
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length)), 8 + length


def open_input_embeddings(path: str | Path, tensor: str | None = None) -> EmbeddingRows:
    """The input-embedding tensor (the one named `tensor`, else the first named like an input embedding),
    memory-mapped. Raises EmbeddingWeightsError with what was found when there is none."""
    seen: list[str] = []
    for file in _files(Path(path)):
        header, data_start = _header(file)
        names = [n for n in header if n != "__metadata__"]
        seen.extend(names)
        if tensor is not None:
            chosen = tensor if tensor in names else None
        else:
            chosen = next((n for n in names if n.endswith(EMBEDDING_TENSOR_SUFFIXES)), None)
        if chosen is not None:
            entry = header[chosen]
            return EmbeddingRows(
                file, chosen, entry["dtype"], tuple(entry["shape"]), data_start + entry["data_offsets"][0]
            )
    wanted = repr(tensor) if tensor else f"a tensor ending in one of {list(EMBEDDING_TENSOR_SUFFIXES)}"
    raise EmbeddingWeightsError(f"{path}: no {wanted} (found {seen[:8]}{' ...' if len(seen) > 8 else ''})")
