"""Seeded train/dev/test split: the same spec gives the same split on every worker and every run."""

from __future__ import annotations

import random
from dataclasses import dataclass

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True, slots=True)
class SplitSpec:
    train: float = 0.5
    dev: float = 0.25
    test: float = 0.25
    seed: int = 0


def split_sizes(n: int, spec: SplitSpec) -> tuple[int, int, int]:
    """Sizes proportional to the fractions; every split with a non-zero fraction gets at least one
    example when there are enough, and the rounding remainder goes to train."""
    fractions = (spec.train, spec.dev, spec.test)
    total = sum(fractions)
    sizes = [int(n * f / total) for f in fractions]
    wanted = [i for i, f in enumerate(fractions) if f > 0]
    for i in wanted:
        if sizes[i] == 0 and n >= len(wanted):
            sizes[i] = 1
    while sum(sizes) > n:  # the minimums above may overshoot on tiny sets
        largest = max(range(3), key=lambda i: sizes[i])
        sizes[largest] -= 1
    sizes[0] += n - sum(sizes)
    return sizes[0], sizes[1], sizes[2]


def split_indices(n: int, spec: SplitSpec) -> dict[str, list[int]]:
    order = list(range(n))
    random.Random(spec.seed).shuffle(order)
    n_train, n_dev, _ = split_sizes(n, spec)
    return {
        "train": sorted(order[:n_train]),
        "dev": sorted(order[n_train : n_train + n_dev]),
        "test": sorted(order[n_train + n_dev :]),
    }
