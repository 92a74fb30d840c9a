"""The input-embedding matrix of a model served elsewhere, read from its safetensors weights.

An HTTP backend that takes `prompt_embeds` (vLLM `--enable-prompt-embeds`) has to be sent the embeddings of the
whole prompt, text included, so the client needs the served model's embedding matrix. It is read once from the
same weights the server loads (a `.safetensors` file, a model directory of them, or the server's Hugging Face
cache entry `hub/models--Org--Name`); nothing is downloaded. Rows are read from the file in its own dtype as a
prompt needs them and converted to float32, so a process holds the rows it is using, not the matrix (which as
float32 would be 74 MB for SmolLM2-135M and 2.2 GB for a 7B model with a 152k vocabulary, per process).
"""

from __future__ import annotations

import json
import os
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
# Bytes of the stored tensor read at a time when a whole-matrix statistic is computed (a few times this in
# float32 while a chunk is summed).
_CHUNK_BYTES = 4 * 1024**2


class EmbeddingRows:
    """A (vocab, hidden) embedding tensor in a safetensors file; `rows[ids]` reads those rows and gives them as
    float32.

    Rows are read with `pread`, not through a memory map: a mapped row makes the kernel map the pages around it too
    (a whole large folio, 2 MB on some filesystems), so gathering scattered token ids left most of the matrix
    resident in the process. Read, a process holds only the rows it copied; the file stays in the page cache,
    shared with every other process and reclaimable."""

    def __init__(self, file: Path, name: str, dtype: str, shape: tuple[int, int], offset: int) -> None:
        self._fd = -1
        if dtype not in _STORED_DTYPES:
            raise EmbeddingWeightsError(f"{file}: tensor {name!r} has dtype {dtype}; supported: {list(_STORED_DTYPES)}")
        if len(shape) != 2:
            raise EmbeddingWeightsError(f"{file}: tensor {name!r} has shape {tuple(shape)}, not 2-D")
        self.file, self.name, self.dtype = file, name, dtype
        self.shape = (int(shape[0]), int(shape[1]))
        self._stored = np.dtype(_STORED_DTYPES[dtype])
        self._row_bytes = self.shape[1] * self._stored.itemsize
        self._offset = offset
        if file.stat().st_size < offset + self.shape[0] * self._row_bytes:
            raise EmbeddingWeightsError(f"{file}: tensor {name!r} is cut short")
        self._fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._std: float | None = None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _widen(self, stored: np.ndarray) -> np.ndarray:
        """float32 rows, always a new array."""
        if self.dtype == "BF16":
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)

    def _read(self, first: int, count: int, into: np.ndarray) -> None:
        """Rows [first, first + count) of the stored tensor into `into` (C-contiguous, `count` rows)."""
        view = memoryview(into).cast("B")
        position, done = self._offset + first * self._row_bytes, 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], position + done)
            if got <= 0:
                raise EmbeddingWeightsError(f"{self.file}: tensor {self.name!r} is cut short")
            done += got

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -self.shape[0] or flat.max() >= self.shape[0]):
            raise IndexError(f"token ids outside the {self.shape[0]}-row embedding matrix")
        if not flat.size:
            return np.empty((*ids.shape, self.shape[1]), dtype=np.float32)
        unique, inverse = np.unique(np.where(flat < 0, flat + self.shape[0], flat), return_inverse=True)
        stored = np.empty((len(unique), self.shape[1]), dtype=self._stored)
        # One read per run of consecutive ids.
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for start, end in zip(np.r_[0, breaks], np.r_[breaks, len(unique)], strict=True):
            self._read(int(unique[start]), int(end - start), stored[start:end])
        return self._widen(stored)[inverse.reshape(-1)].reshape(*ids.shape, self.shape[1])

    def std(self) -> float:
        """The standard deviation of every entry (BBT's projection scale), computed once, in chunks."""
        if self._std is None:
            rows_per_chunk = max(1, _CHUNK_BYTES // self._row_bytes)
            buffer = np.empty((rows_per_chunk, self.shape[1]), dtype=self._stored)
            count, total, squares = 0, 0.0, 0.0
            for start in range(0, self.shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, self.shape[0] - start)
                self._read(start, rows, buffer[:rows])
                chunk = self._widen(buffer[:rows])
                count += chunk.size
                total += float(chunk.sum(dtype=np.float64))
                squares += float(np.square(chunk, out=chunk).sum(dtype=np.float64))
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
