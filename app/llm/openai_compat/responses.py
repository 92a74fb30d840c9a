"""Reading OpenAI-compatible answers: choices, first-position top log-probs, embeddings, usage split across prompts."""

from __future__ import annotations

import math
from typing import Any

from app.llm.port import BackendError


def choices_of(data: Any, name: str) -> list[dict]:
    """The answer's choices in `index` order."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise BackendError(f"{name}: the server answered without choices")
    return sorted((c for c in choices if isinstance(c, dict)), key=lambda c: c.get("index", 0))


def first_top_logprobs(choice: dict) -> dict[str, float]:
    """`choice.logprobs.top_logprobs[0]` (legacy completions shape); {} where the server sent none."""
    logprobs = choice.get("logprobs") or {}
    top = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
    if not top:
        return {}
    first = top[0]
    return first if isinstance(first, dict) else {}


def embeddings_of(data: Any, count: int, name: str) -> list[list[float]]:
    """The `count` vectors of an `/v1/embeddings` answer, in `index` order; all of one size, all finite."""
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list) or len(items) != count:
        raise BackendError(f"{name}: {count} texts were answered with {len(items or [])} embeddings")
    items = sorted((item for item in items if isinstance(item, dict)), key=lambda item: item.get("index", 0))
    vectors = [item.get("embedding") for item in items]
    ok = len(vectors) == count and all(
        isinstance(v, list) and v and all(isinstance(x, int | float) and math.isfinite(x) for x in v) for v in vectors
    )
    if not ok or len({len(v) for v in vectors}) != 1:  # type: ignore[arg-type]
        raise BackendError(f"{name}: the embeddings answer is not one list of finite numbers per text, all one size")
    return [[float(x) for x in v] for v in vectors]  # type: ignore[union-attr]


def token_id_key(key: str) -> int | None:
    """vLLM's `return_tokens_as_token_ids` keys read `token_id:123`."""
    if key.startswith("token_id:"):
        try:
            return int(key[len("token_id:") :])
        except ValueError:
            return None
    return None


def estimate_tokens(text: str) -> int:
    """Used only when a server omits `usage`: ~4 characters a token."""
    return math.ceil(len(text) / 4) if text else 0


def split_total(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder), so the parts sum to it exactly.

    One request carrying many prompts gets one `usage` for all of them; each prompt is charged its share by its
    estimated size, and the job's total stays the server's count."""
    if not weights:
        return []
    weight_sum = sum(weights)
    if weight_sum <= 0:
        weights, weight_sum = [1] * len(weights), len(weights)
    exact = [total * w / weight_sum for w in weights]
    parts = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts
