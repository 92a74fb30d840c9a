"""Uncertainty for reported results: score intervals, across-seed intervals, and paired prompt comparisons.

Pure functions over per-example outcomes (each in [0, 1]) or per-run scores. Every resampling procedure takes an
explicit ``seed`` so a reported interval or p-value can be reproduced exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy import stats

# Resampling is done in blocks of at most this many cells (rows x examples) to bound memory on large test sets.
_BLOCK_CELLS = 1 << 22
# Sign-flip tests enumerate all 2**n sign patterns up to this n; above it they sample patterns at random.
_EXACT_SIGN_FLIP_MAX_N = 16
# Tolerance for "at least as extreme" so floating-point noise does not drop the observed pattern itself.
_TIE_EPS = 1e-12
# Exact binomial tails via integer arithmetic up to this many discordant pairs; scipy beyond.
_EXACT_BINOMIAL_MAX_N = 2000


def _json_safe(result) -> dict[str, object]:
    """A result dataclass as plain JSON values: floats rounded to 4 decimals (the p-value to 6, so that small
    p-values stay distinguishable), ints and bools as Python's own."""
    out: dict[str, object] = {}
    for item in fields(result):
        value = getattr(result, item.name)
        if isinstance(value, bool | np.bool_):
            out[item.name] = bool(value)
        elif isinstance(value, int | np.integer):
            out[item.name] = int(value)
        elif isinstance(value, float | np.floating):
            out[item.name] = round(float(value), 6 if item.name == "p_value" else 4)
        else:
            out[item.name] = value
    return out


@dataclass(frozen=True, slots=True)
class ScoreInterval:
    """A test score (mean per-example outcome) with its confidence interval."""

    n: int
    mean: float
    stderr: float
    low: float
    high: float
    method: str

    def as_dict(self) -> dict[str, object]:
        return _json_safe(self)


@dataclass(frozen=True, slots=True)
class MeanInterval:
    """The mean of a few per-run scores (e.g. one per seed) with a bootstrap interval."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    method: str

    def as_dict(self) -> dict[str, object]:
        return _json_safe(self)


@dataclass(frozen=True, slots=True)
class PairedComparison:
    """Candidate vs baseline on the same examples: mean difference, its interval, and a paired significance test."""

    n: int
    candidate_mean: float
    baseline_mean: float
    difference: float
    low: float
    high: float
    p_value: float
    test: str
    wins: int
    losses: int
    ties: int
    significant: bool

    def as_dict(self) -> dict[str, object]:
        return _json_safe(self)


def _as_array(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of numbers")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains a non-finite value")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")


def _z(confidence: float) -> float:
    return float(stats.norm.ppf(0.5 + confidence / 2.0))


def _is_binary(arr: np.ndarray) -> bool:
    return bool(np.all((arr == 0.0) | (arr == 1.0)))


def _sd(arr: np.ndarray) -> float:
    return float(np.std(arr, ddof=1)) if arr.size > 1 else 0.0


def _block_rows(n: int, rows: int) -> int:
    return max(1, min(rows, _BLOCK_CELLS // max(n, 1)))


def _bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Means of ``resamples`` with-replacement resamples of ``values``."""
    n = values.size
    out = np.empty(resamples, dtype=float)
    step = _block_rows(n, resamples)
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        idx = rng.integers(0, n, size=(rows, n))
        out[start : start + rows] = values[idx].mean(axis=1)
    # A resample's mean cannot leave [min, max]; clipping removes rounding noise (e.g. 0.8000000000000002).
    return np.clip(out, values.min(), values.max())


def _percentile_interval(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def score_interval(outcomes: Sequence[float], confidence: float = 0.95) -> ScoreInterval:
    """A test score from per-example outcomes in [0, 1]: Wilson interval for 0/1 outcomes, else a clipped normal one."""
    _check_confidence(confidence)
    arr = _as_array(outcomes, "outcomes")
    if np.any((arr < 0.0) | (arr > 1.0)):
        raise ValueError("outcomes must lie in [0, 1]")
    n = int(arr.size)
    mean = float(arr.mean())
    stderr = _sd(arr) / math.sqrt(n)
    z = _z(confidence)
    if _is_binary(arr):
        z2 = z * z
        denom = 1.0 + z2 / n
        center = (mean + z2 / (2.0 * n)) / denom
        half = (z / denom) * math.sqrt(mean * (1.0 - mean) / n + z2 / (4.0 * n * n))
        low, high, method = center - half, center + half, "wilson"
    else:
        low, high, method = mean - z * stderr, mean + z * stderr, "normal"
    return ScoreInterval(
        n=n, mean=mean, stderr=stderr, low=min(max(low, 0.0), 1.0), high=min(max(high, 0.0), 1.0), method=method
    )


def bootstrap_mean_interval(
    values: Sequence[float], seed: int, confidence: float = 0.95, resamples: int = 10_000
) -> MeanInterval:
    """Mean of a few per-run scores (e.g. across seeds) with a percentile-bootstrap interval."""
    _check_confidence(confidence)
    _check_resamples(resamples)
    arr = _as_array(values, "values")
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        low = high = mean
    else:
        rng = np.random.default_rng(seed)
        low, high = _percentile_interval(_bootstrap_means(arr, rng, resamples), confidence)
    return MeanInterval(n=n, mean=mean, sd=_sd(arr), low=low, high=high, method="percentile bootstrap")


def _binomial_lower_tail_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 0.5)."""
    if n <= _EXACT_BINOMIAL_MAX_N:
        term, total = 1, 1
        for i in range(1, k + 1):
            term = term * (n - i + 1) // i
            total += term
        return total / (1 << n)
    return float(stats.binom.cdf(k, n, 0.5))


def _exact_mcnemar(wins: int, losses: int) -> float:
    discordant = wins + losses
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * _binomial_lower_tail_half(min(wins, losses), discordant))


def _sign_flip_p(diffs: np.ndarray, rng: np.random.Generator, resamples: int) -> float:
    """Two-sided paired sign-flip permutation p-value for the mean of ``diffs``; exact for small n."""
    n = diffs.size
    threshold = abs(float(diffs.mean())) - _TIE_EPS
    if n <= _EXACT_SIGN_FLIP_MAX_N:
        patterns = np.arange(1 << n, dtype=np.int64)
        signs = ((patterns[:, None] >> np.arange(n)) & 1) * 2 - 1
        means = signs @ diffs / n
        return float(np.count_nonzero(np.abs(means) >= threshold)) / float(1 << n)
    hits = 0
    step = _block_rows(n, resamples)
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        signs = rng.integers(0, 2, size=(rows, n)) * 2 - 1
        means = signs @ diffs / n
        hits += int(np.count_nonzero(np.abs(means) >= threshold))
    return (1.0 + hits) / (1.0 + resamples)


def paired_comparison(
    candidate: Sequence[float],
    baseline: Sequence[float],
    seed: int,
    confidence: float = 0.95,
    resamples: int = 10_000,
) -> PairedComparison:
    """Compare two prompts' per-example outcomes on the same examples (same order): is the candidate really better?"""
    _check_confidence(confidence)
    _check_resamples(resamples)
    cand = np.asarray(candidate, dtype=float)
    base = np.asarray(baseline, dtype=float)
    if cand.shape != base.shape:
        raise ValueError(f"candidate and baseline differ in length ({cand.size} vs {base.size})")
    cand = _as_array(cand, "candidate")
    base = _as_array(base, "baseline")
    n = int(cand.size)
    diffs = cand - base
    wins = int(np.count_nonzero(cand > base))
    losses = int(np.count_nonzero(cand < base))
    rng = np.random.default_rng(seed)
    low, high = _percentile_interval(_bootstrap_means(diffs, rng, resamples), confidence)
    if _is_binary(cand) and _is_binary(base):
        p_value, test = _exact_mcnemar(wins, losses), "exact McNemar"
    else:
        p_value, test = _sign_flip_p(diffs, rng, resamples), "paired sign-flip permutation"
    candidate_mean, baseline_mean = float(cand.mean()), float(base.mean())
    return PairedComparison(
        n=n,
        candidate_mean=candidate_mean,
        baseline_mean=baseline_mean,
        difference=candidate_mean - baseline_mean,
        low=low,
        high=high,
        p_value=p_value,
        test=test,
        wins=wins,
        losses=losses,
        ties=n - wins - losses,
        significant=p_value < 1.0 - confidence,
    )


def pooled_paired_comparison(
    pairs: Sequence[tuple[Sequence[float], Sequence[float]]],
    seed: int,
    confidence: float = 0.95,
    resamples: int = 10_000,
) -> PairedComparison:
    """Paired comparison pooled over several runs (seeds), each (candidate, baseline) on that run's own examples."""
    candidate: list[float] = []
    baseline: list[float] = []
    for i, (cand, base) in enumerate(pairs):
        if len(cand) != len(base):
            raise ValueError(f"pair {i}: candidate and baseline differ in length ({len(cand)} vs {len(base)})")
        candidate.extend(float(x) for x in cand)
        baseline.extend(float(x) for x in base)
    return paired_comparison(candidate, baseline, seed=seed, confidence=confidence, resamples=resamples)
