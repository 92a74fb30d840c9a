"""ClaPS steps 2 and 3 as pure functions: the reward, the influence score, pruning, and the genetic operators.

Token strings are lists of indices into the pruned vocabulary.
"""

from __future__ import annotations

import numpy as np

# JSON has no -inf; the evaluation cache stores unseen verbalizers at this floor, so do we.
_FLOOR = -1e9


def class_log_probs(logprobs: list[list[float]]) -> np.ndarray:
    """(examples, labels) log-probs of the verbalizer-restricted class distribution: log-softmax over labels."""
    lp = np.nan_to_num(np.asarray(logprobs, dtype=np.float64), nan=_FLOOR, neginf=_FLOOR, posinf=-_FLOOR)
    top = lp.max(axis=1, keepdims=True)
    return lp - top - np.log(np.exp(lp - top).sum(axis=1, keepdims=True))


def reward_and_accuracy(logprobs: list[list[float]], gold: list[int]) -> tuple[float, float]:
    """reward = -(mean cross-entropy of the class distribution against the gold labels); accuracy = share of
    examples whose highest verbalizer log-prob is the gold one (ties: the first label, as the evaluator does)."""
    if not gold:
        return 0.0, 0.0
    y = np.asarray(gold)
    rows = np.arange(len(y))
    log_p = class_log_probs(logprobs)
    accuracy = float((np.argmax(np.asarray(logprobs, dtype=np.float64), axis=1) == y).mean())
    return float(log_p[rows, y].mean()), accuracy


def kl_divergence(logprobs: list[list[float]], reference: list[list[float]]) -> float:
    """Sum over examples of KL(p || p_ref) between the class distributions."""
    log_p, log_q = class_log_probs(logprobs), class_log_probs(reference)
    return float((np.exp(log_p) * (log_p - log_q)).sum())


def prune(influence: list[float], percentile: float, min_keep: int) -> list[int]:
    """Indices of the scores strictly above their `percentile`-th percentile (linear interpolation), at least
    `min_keep` of them (the highest), ordered by score, highest first (ties: lower index first)."""
    if not influence:
        return []
    scores = np.asarray(influence, dtype=np.float64)
    threshold = np.percentile(scores, percentile)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = [i for i in order if scores[i] > threshold]
    if len(kept) < min_keep:
        kept = order[: min(min_keep, len(order))]
    return kept


def mutate(parent: list[int], n_tokens: int, prob: float, rng: np.random.Generator) -> list[int]:
    """Each token replaced, with probability `prob`, by a uniformly drawn token of the pruned vocabulary."""
    draws = rng.random(len(parent))
    replacements = rng.integers(n_tokens, size=len(parent))
    return [int(r) if d < prob else int(t) for t, d, r in zip(parent, draws, replacements, strict=True)]


def crossover(a: list[int], b: list[int], rng: np.random.Generator) -> list[int]:
    """Uniform per-token crossover: every position takes its token from `a` or `b` with equal chance."""
    take_a = rng.random(len(a)) < 0.5
    return [int(x) if pick else int(y) for x, y, pick in zip(a, b, take_a, strict=True)]


def next_generation(
    parents: list[list[int]],
    n_tokens: int,
    n_mutants: int,
    n_crossovers: int,
    mutation_prob: float,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Parents + mutants (of uniformly drawn parents) + children (of two distinct parents when there are two)."""
    population = [list(p) for p in parents]
    for _ in range(n_mutants):
        parent = parents[int(rng.integers(len(parents)))]
        population.append(mutate(parent, n_tokens, mutation_prob, rng))
    for _ in range(n_crossovers):
        if len(parents) >= 2:
            i, j = (int(k) for k in rng.choice(len(parents), size=2, replace=False))
        else:
            i = j = 0
        population.append(crossover(parents[i], parents[j], rng))
    return population
