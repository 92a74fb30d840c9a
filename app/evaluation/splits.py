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


def split_indices(n: int, spec: SplitSpec) -> dict[str, list[int]]:
    order = list(range(n))
    random.Random(spec.seed).shuffle(order)
    total = spec.train + spec.dev + spec.test
    n_train = round(n * spec.train / total)
    n_dev = round(n * spec.dev / total)
    if spec.test > 0 and n_train + n_dev >= n and n >= 3:
        n_dev = max(1, n - n_train - 1)
    return {
        "train": sorted(order[:n_train]),
        "dev": sorted(order[n_train : n_train + n_dev]),
        "test": sorted(order[n_train + n_dev :]),
    }
