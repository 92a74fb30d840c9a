"""ClaPS step 1: the candidate words and their k-means representatives (numpy + scikit-learn, no torch).

A word is kept as a *piece*: its text with one leading space (" great"), so a prompt is the concatenation of its
pieces with the outer spaces stripped, whatever tokenizer the words came from.
"""

from __future__ import annotations

import numpy as np

# Word-start markers: byte-level BPE (GPT-2, SmolLM2, RoBERTa) and SentencePiece (T5, Llama).
WORD_START = ("\u0120", "\u2581")
_CENTROID_CHUNK = 256


def word_start_tokens(pieces: list[str], texts: list[str]) -> tuple[list[str], list[int]]:
    """Word-start tokens of a vocabulary (`pieces[i]` is token i's raw piece, `texts[i]` its decoded text): the
    de-duplicated words as pieces (" great") and their token ids. Dropped: tokens without the marker, special
    tokens, whitespace-only or multi-word pieces, and partial UTF-8 bytes (decoded as U+FFFD)."""
    words: list[str] = []
    ids: list[int] = []
    seen: set[str] = set()
    for i, (piece, text) in enumerate(zip(pieces, texts, strict=True)):
        if len(piece) < 2 or not piece.startswith(WORD_START):
            continue
        word = text.strip()
        if not word or "\ufffd" in word or not word.isprintable() or any(ch.isspace() for ch in word):
            continue
        word = " " + word
        if word not in seen:
            seen.add(word)
            words.append(word)
            ids.append(i)
    return words, ids


def cluster_representatives(words: list[str], embeddings: np.ndarray, n_clusters: int, seed: int) -> list[str]:
    """k-means (k = min(n_clusters, len(words)), k-means++ init, one run seeded with `seed`) over the words'
    embeddings; each centroid is replaced by its nearest word and duplicates collapse (first centroid wins)."""
    from sklearn.cluster import KMeans

    if len(words) != len(embeddings):
        raise ValueError(f"{len(words)} words but {len(embeddings)} embeddings")
    if not words:
        return []
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    k = max(1, min(n_clusters, len(words)))
    centers = KMeans(n_clusters=k, random_state=seed, n_init=1).fit(x).cluster_centers_.astype(np.float32)
    norms = (x * x).sum(axis=1)
    nearest: list[int] = []
    for start in range(0, k, _CENTROID_CHUNK):
        block = centers[start : start + _CENTROID_CHUNK]
        # |x - c|^2 up to |c|^2, which does not change the argmin over x.
        nearest.extend(int(i) for i in np.argmin(norms[None, :] - 2.0 * block @ x.T, axis=1))
    return list(dict.fromkeys(words[i] for i in nearest))


def prompt_text(pieces: list[str]) -> str:
    """The prompt a token string stands for: its pieces joined, outer whitespace stripped."""
    return "".join(pieces).strip()
