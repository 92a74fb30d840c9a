"""`app.evaluation.statistics` against hand-computed values on small fixed outcome tables.

The arithmetic behind every expected number is written out in comments so a reviewer can check it by hand.
z for 95% confidence is norm.ppf(0.975) = 1.959964 (z^2 = 3.841459).
"""

from __future__ import annotations

import json
import math

import pytest

from app.evaluation.statistics import (
    MeanInterval,
    PairedComparison,
    ScoreInterval,
    bootstrap_mean_interval,
    paired_comparison,
    pooled_paired_comparison,
    score_interval,
)

TOL = 1e-4  # hand values are given to 4 decimals


# --- score_interval --------------------------------------------------------------------------------------------------


def test_score_interval_binary_uses_wilson() -> None:
    got = score_interval([1, 1, 0, 1, 0])
    assert isinstance(got, ScoreInterval)
    assert got.method == "wilson"
    assert got.n == 5
    # mean = 3/5 = 0.6
    assert got.mean == pytest.approx(0.6)
    # deviations 0.4, 0.4, -0.6, 0.4, -0.6 -> squares 0.16*3 + 0.36*2 = 1.2; var = 1.2/4 = 0.3
    # sd = sqrt(0.3) = 0.547723; stderr = sd/sqrt(5) = sqrt(0.06) = 0.244949
    assert got.stderr == pytest.approx(math.sqrt(0.06))
    # Wilson, n = 5, p = 0.6, z^2 = 3.841459:
    #   denom  = 1 + z^2/n = 1 + 0.768292 = 1.768292
    #   center = (p + z^2/(2n)) / denom = (0.6 + 0.384146) / 1.768292 = 0.984146 / 1.768292 = 0.556552
    #   radic  = p(1-p)/n + z^2/(4n^2) = 0.24/5 + 3.841459/100 = 0.048 + 0.038415 = 0.086415; sqrt = 0.293964
    #   half   = z/denom * sqrt = 1.959964/1.768292 * 0.293964 = 1.108394 * 0.293964 = 0.325827
    #   low  = 0.556552 - 0.325827 = 0.2307;  high = 0.556552 + 0.325827 = 0.8824
    assert got.low == pytest.approx(0.2307, abs=TOL)
    assert got.high == pytest.approx(0.8824, abs=TOL)
    assert got.as_dict() == {
        "n": 5,
        "mean": 0.6,
        "stderr": 0.2449,
        "low": 0.2307,
        "high": 0.8824,
        "method": "wilson",
    }


def test_score_interval_fractional_uses_normal() -> None:
    got = score_interval([0.5, 1.0, 0.0, 0.25])
    assert got.method == "normal"
    # mean = 1.75/4 = 0.4375
    assert got.mean == pytest.approx(0.4375)
    # deviations 0.0625, 0.5625, -0.4375, -0.1875
    # squares 0.00390625 + 0.31640625 + 0.19140625 + 0.03515625 = 0.546875; var = 0.546875/3 = 0.182292
    # sd = sqrt(0.182292) = 0.426956; stderr = sd/sqrt(4) = 0.213478
    assert got.stderr == pytest.approx(0.2135, abs=TOL)
    # z*stderr = 1.959964 * 0.213478 = 0.418409
    # low = 0.4375 - 0.418409 = 0.0191; high = 0.4375 + 0.418409 = 0.8559 (no clipping needed)
    assert got.low == pytest.approx(0.0191, abs=TOL)
    assert got.high == pytest.approx(0.8559, abs=TOL)


def test_score_interval_normal_is_clipped_at_zero() -> None:
    got = score_interval([0.0, 0.0, 0.5])
    assert got.method == "normal"
    # mean = 0.5/3 = 1/6 = 0.1667
    # deviations -1/6, -1/6, 1/3 -> squares 1/36 + 1/36 + 4/36 = 1/6; var = (1/6)/2 = 1/12
    # stderr = sqrt(1/12)/sqrt(3) = sqrt(1/36) = 1/6
    assert got.stderr == pytest.approx(1 / 6)
    # low = 1/6 - 1.959964/6 = -0.1600 -> clipped to 0; high = 1/6 + 1.959964/6 = 2.959964/6 = 0.4933
    assert got.low == 0.0
    assert got.high == pytest.approx(0.4933, abs=TOL)


def test_score_interval_single_example() -> None:
    # n = 1: stderr is defined as 0.
    one = score_interval([1.0])
    assert (one.n, one.mean, one.stderr, one.method) == (1, 1.0, 0.0, "wilson")
    # Wilson with p = 1, n = 1: center = (1 + z^2/2)/(1 + z^2), half = z^2/(2(1 + z^2))
    #   low = 1/(1 + z^2) = 1/4.841459 = 0.2065; high = (1 + z^2)/(1 + z^2) = 1
    assert one.low == pytest.approx(0.2065, abs=TOL)
    assert one.high == pytest.approx(1.0)
    frac = score_interval([0.3])
    # Normal with stderr 0: the interval collapses to the mean.
    assert (frac.method, frac.stderr, frac.low, frac.high) == ("normal", 0.0, 0.3, 0.3)


def test_score_interval_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        score_interval([])
    with pytest.raises(ValueError):
        score_interval([0.5, 1.5])
    with pytest.raises(ValueError):
        score_interval([0.5], confidence=1.0)


# --- bootstrap_mean_interval -----------------------------------------------------------------------------------------


def test_bootstrap_mean_interval_three_seeds() -> None:
    got = bootstrap_mean_interval([0.6, 0.7, 0.8], seed=0)
    assert isinstance(got, MeanInterval)
    assert got.method == "percentile bootstrap"
    assert got.n == 3
    # mean = 2.1/3 = 0.7; deviations -0.1, 0, 0.1 -> squares 0.02; var = 0.02/2 = 0.01; sd = 0.1
    assert got.mean == pytest.approx(0.7)
    assert got.sd == pytest.approx(0.1)
    # Any resample's mean lies between the smallest and the largest value.
    assert 0.6 <= got.low <= 0.7 <= got.high <= 0.8
    assert got.low < got.high
    assert got.as_dict()["mean"] == 0.7
    assert got.as_dict()["sd"] == 0.1


def test_bootstrap_mean_interval_is_deterministic_per_seed() -> None:
    values = [0.61, 0.72, 0.64, 0.70]
    assert bootstrap_mean_interval(values, seed=7) == bootstrap_mean_interval(values, seed=7)
    assert bootstrap_mean_interval(values, seed=7, resamples=500) == bootstrap_mean_interval(
        values, seed=7, resamples=500
    )


def test_bootstrap_mean_interval_single_value_and_empty() -> None:
    got = bootstrap_mean_interval([0.42], seed=0)
    assert (got.n, got.mean, got.sd, got.low, got.high) == (1, 0.42, 0.0, 0.42, 0.42)
    with pytest.raises(ValueError):
        bootstrap_mean_interval([], seed=0)


# --- paired_comparison: binary outcomes (exact McNemar) --------------------------------------------------------------

# 12 examples: 6 candidate-only correct (wins), 1 baseline-only correct (loss), 3 both correct, 2 both wrong (ties).
CAND_671 = [1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0]
BASE_671 = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]


def test_paired_binary_mcnemar_b6_c1() -> None:
    got = paired_comparison(CAND_671, BASE_671, seed=0)
    assert isinstance(got, PairedComparison)
    assert got.test == "exact McNemar"
    assert (got.n, got.wins, got.losses, got.ties) == (12, 6, 1, 5)
    # candidate mean = 9/12 = 0.75; baseline mean = 4/12 = 0.3333; difference = 5/12 = 0.4167
    assert got.candidate_mean == pytest.approx(0.75)
    assert got.baseline_mean == pytest.approx(1 / 3)
    assert got.difference == pytest.approx(5 / 12)
    # b = 6, c = 1, X ~ Bin(7, 0.5): P(X <= 1) = (C(7,0) + C(7,1)) / 2^7 = (1 + 7)/128 = 0.0625
    # p = 2 * 0.0625 = 0.125 exactly -> not significant at 0.05
    assert got.p_value == 0.125
    assert got.significant is False
    # Differences d_i lie in {-1, 0, 1}, so the bootstrap interval of their mean does too, and it contains 5/12.
    assert -1.0 <= got.low <= got.difference <= got.high <= 1.0


def test_paired_binary_mcnemar_b10_c0_is_significant() -> None:
    got = paired_comparison([1] * 10, [0] * 10, seed=0)
    assert (got.wins, got.losses, got.ties) == (10, 0, 0)
    # X ~ Bin(10, 0.5): P(X <= 0) = 1/1024; p = 2/1024 = 0.001953125 < 0.05
    assert got.p_value == 0.001953125
    assert got.significant is True
    # every d_i = 1, so every resampled mean is 1
    assert (got.difference, got.low, got.high) == (1.0, 1.0, 1.0)
    assert got.as_dict()["p_value"] == 0.001953


def test_paired_equal_inputs() -> None:
    got = paired_comparison([1, 0, 1, 1], [1, 0, 1, 1], seed=0)
    # b + c = 0 -> p = 1.0 by definition
    assert got.p_value == 1.0
    assert got.difference == 0.0
    assert (got.low, got.high) == (0.0, 0.0)
    assert (got.wins, got.losses, got.ties) == (0, 0, 4)
    assert got.significant is False
    frac = paired_comparison([0.5, 0.25], [0.5, 0.25], seed=0)
    # non-binary, all d_i = 0: every sign pattern has |mean| = 0 >= 0 - 1e-12 -> p = 4/4 = 1
    assert (frac.test, frac.p_value, frac.difference) == ("paired sign-flip permutation", 1.0, 0.0)


def test_paired_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        paired_comparison([1, 0], [1], seed=0)
    with pytest.raises(ValueError):
        paired_comparison([], [], seed=0)


# --- paired_comparison: non-binary outcomes (sign-flip permutation) --------------------------------------------------


def test_paired_sign_flip_exact_enumeration() -> None:
    candidate = [0.75, 0.5, 0.5, 0.0]
    baseline = [0.25, 0.25, 0.25, 0.25]
    got = paired_comparison(candidate, baseline, seed=0)
    assert got.test == "paired sign-flip permutation"
    # d = [0.5, 0.25, 0.25, -0.25]; observed mean = 0.75/4 = 0.1875, i.e. |sum| >= 0.75 counts as extreme.
    # Signed sum = +-0.5 + (sum of three +-0.25 terms); the three-term part is
    #   +0.75 (1 pattern), +0.25 (3 patterns), -0.25 (3 patterns), -0.75 (1 pattern).
    # With +0.5: totals 1.25 (1), 0.75 (3), 0.25 (3), -0.25 (1) -> |sum| >= 0.75 in 1 + 3 = 4 patterns.
    # With -0.5: the mirror image -> 4 patterns.  p = 8/16 = 0.5 exactly.
    assert got.p_value == 0.5
    assert got.significant is False
    # candidate mean 1.75/4 = 0.4375, baseline 0.25, difference 0.1875; wins 3 (first three), losses 1, ties 0
    assert got.candidate_mean == pytest.approx(0.4375)
    assert got.difference == pytest.approx(0.1875)
    assert (got.wins, got.losses, got.ties) == (3, 1, 0)
    # n <= 16 is exact: the seed does not matter for the p-value
    assert paired_comparison(candidate, baseline, seed=123).p_value == 0.5


def test_paired_sign_flip_exact_all_positive() -> None:
    # d = [0.5, 0.25, 0.25] all positive: only the all-plus and all-minus patterns reach |mean| = 1/3.
    # p = 2/2^3 = 0.25
    got = paired_comparison([0.5, 0.5, 0.75], [0.0, 0.25, 0.5], seed=0)
    assert got.p_value == 0.25


def test_paired_sign_flip_monte_carlo_path() -> None:
    # n = 40 > 16, so patterns are sampled; the candidate is clearly better on every example.
    baseline = [0.1 + 0.02 * (i % 5) for i in range(40)]
    candidate = [b + 0.3 + 0.05 * (i % 3) for i, b in enumerate(baseline)]
    first = paired_comparison(candidate, baseline, seed=3)
    again = paired_comparison(candidate, baseline, seed=3)
    assert first == again
    assert first.test == "paired sign-flip permutation"
    assert 0.0 < first.p_value <= 1.0
    # all 40 d_i > 0: a random pattern matches only if all signs agree (prob 2/2^40), so p = 1/(1 + 10000)
    assert first.p_value < 0.01
    assert first.p_value == pytest.approx(1 / 10_001)
    assert first.significant is True
    assert first.low > 0.0


def test_paired_sign_flip_monte_carlo_hand_values() -> None:
    # n = 18, one d_i = 0.5 and seventeen d_i = 0: every sign pattern gives |mean| = 0.5/18, equal to the
    # observed one, so every resample counts: p = (1 + R)/(1 + R) = 1.
    got = paired_comparison([0.5] + [0.2] * 17, [0.0] + [0.2] * 17, seed=0, resamples=2_000)
    assert got.p_value == 1.0
    assert (got.wins, got.losses, got.ties) == (1, 0, 17)
    # A noisy null (differences symmetric around 0) is not significant and depends on the seed only.
    noise_c = [0.5 + (0.25 if i % 2 else -0.25) for i in range(30)]
    noise_b = [0.5] * 30
    null = paired_comparison(noise_c, noise_b, seed=11)
    assert null.p_value > 0.5
    assert null.p_value == paired_comparison(noise_c, noise_b, seed=11).p_value


# --- pooled_paired_comparison ----------------------------------------------------------------------------------------


def test_pooled_equals_concatenation() -> None:
    run_a = ([1, 1, 0, 1], [0, 1, 0, 0])
    run_b = ([1, 0, 1], [0, 0, 1])
    pooled = pooled_paired_comparison([run_a, run_b], seed=5)
    direct = paired_comparison(run_a[0] + run_b[0], run_a[1] + run_b[1], seed=5)
    assert pooled == direct
    # wins: run a 2 (examples 1, 4), run b 1 (example 1); losses 0 -> p = 2 * P(Bin(3, .5) <= 0) = 2/8 = 0.25
    assert (pooled.n, pooled.wins, pooled.losses, pooled.ties) == (7, 3, 0, 4)
    assert pooled.p_value == 0.25
    frac_a = ([0.5, 0.75], [0.25, 0.25])
    frac_b = ([0.0, 1.0, 0.5], [0.25, 0.5, 0.5])
    assert pooled_paired_comparison([frac_a, frac_b], seed=1, resamples=1_000) == paired_comparison(
        frac_a[0] + frac_b[0], frac_a[1] + frac_b[1], seed=1, resamples=1_000
    )


def test_pooled_rejects_mismatched_or_empty() -> None:
    with pytest.raises(ValueError):
        pooled_paired_comparison([([1, 0], [1, 0]), ([1, 0, 1], [1, 0])], seed=0)
    with pytest.raises(ValueError):
        pooled_paired_comparison([], seed=0)


def test_as_dict_is_json_safe() -> None:
    got = paired_comparison([0.5, 0.75, 0.25], [0.25, 0.25, 0.5], seed=0)
    encoded = json.loads(json.dumps(got.as_dict()))
    assert encoded["test"] == "paired sign-flip permutation"
    assert isinstance(encoded["significant"], bool)
    assert isinstance(encoded["n"], int)
    # d = [0.25, 0.5, -0.25], mean 0.5/3 = 0.1667
    assert encoded["difference"] == 0.1667
