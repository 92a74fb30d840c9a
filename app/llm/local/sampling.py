"""Sampling for `generate`: one row per sample, each with its own seeded generator, and the token choice."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SampleRow:
    """One sample to generate: request `req` (index into the request list), sample `k` of its n."""

    req: int
    k: int
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int
    stop: tuple[str, ...]
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    generated: int = 0


def choose(logits, temperature: float, generator) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature) with the row's generator."""
    import torch

    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
