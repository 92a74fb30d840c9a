"""Seeded train/dev/test split: the same spec gives the same split on every worker and every run.

Two kinds: `fraction` (a shuffled split by fractions) and `k_shot` (stratified: `train_per_class` and
`dev_per_class` examples of each target class, the rest for test), the usual protocol of few-shot papers."""

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
    kind: str = "fraction"  # or "k_shot"
    train_per_class: int | None = None
    dev_per_class: int | None = None


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


def k_shot_indices(targets: list[str], spec: SplitSpec) -> dict[str, list[int]]:
    """Per class (target value), in a seeded order: the first `train_per_class` to train, the next `dev_per_class`
    to dev, the rest to test. A class with too few examples fills train first."""
    by_class: dict[str, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    rng = random.Random(spec.seed)
    k_train = spec.train_per_class or 0
    k_dev = spec.dev_per_class if spec.dev_per_class is not None else k_train
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for target in sorted(by_class):
        members = by_class[target]
        rng.shuffle(members)
        out["train"] += members[:k_train]
        out["dev"] += members[k_train : k_train + k_dev]
        out["test"] += members[k_train + k_dev :]
    return {name: sorted(indices) for name, indices in out.items()}


def task_split_indices(targets: list[str], spec: SplitSpec) -> dict[str, list[int]]:
    return k_shot_indices(targets, spec) if spec.kind == "k_shot" else split_indices(len(targets), spec)
