"""The input-embedding matrix of a model served elsewhere, read from its safetensors weights.

An HTTP backend that takes `prompt_embeds` (vLLM `--enable-prompt-embeds`) has to be sent the embeddings of the
whole prompt, text included, so the client needs the served model's embedding matrix. It is read once from the
same weights the server loads (a `.safetensors` file, a model directory of them, or the server's Hugging Face
cache entry `hub/models--Org--Name`); nothing is downloaded. Held in memory as float32: vocab x hidden x 4 bytes
(74 MB for SmolLM2-135M, 2.2 GB for a 7B model with a 152k vocabulary).
"""

from __future__ import annotations

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


def load_input_embeddings(path: str | Path, tensor: str | None = None) -> np.ndarray:
    """(vocab, hidden) float32 matrix: the tensor named `tensor`, else the first whose name ends like an input
    embedding. Raises EmbeddingWeightsError with what was found when there is none."""
    from safetensors import safe_open

    seen: list[str] = []
    for file in _files(Path(path)):
        with safe_open(str(file), framework="pt") as handle:
            names = list(handle.keys())
            seen.extend(names)
            if tensor is not None:
                chosen = tensor if tensor in names else None
            else:
                chosen = next((n for n in names if n.endswith(EMBEDDING_TENSOR_SUFFIXES)), None)
            if chosen is not None:
                matrix = handle.get_tensor(chosen).float().numpy()
                if matrix.ndim != 2:
                    raise EmbeddingWeightsError(f"{file}: tensor {chosen!r} has shape {matrix.shape}, not 2-D")
                return np.ascontiguousarray(matrix, dtype=np.float32)
    wanted = repr(tensor) if tensor else f"a tensor ending in one of {list(EMBEDDING_TENSOR_SUFFIXES)}"
    raise EmbeddingWeightsError(f"{path}: no {wanted} (found {seen[:8]}{' ...' if len(seen) > 8 else ''})")
