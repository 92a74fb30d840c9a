"""Best-arm identification for APO's candidate selection (docs/methods/apo.md), written as pure functions.

An *arm* is a candidate prompt; *pulling* arms on k examples returns one 0..1 reward per example and arm. The
caller supplies the pull as an async callback `pull(arms, k) -> rewards`, where `rewards[j]` holds the rewards of
`arms[j]` (at most k of them: fewer when the example pool is smaller). Each bandit round makes exactly ONE
callback call for all the arms it evaluates in that round, so the caller can send them as one batch.

Strategies, each returning the `keep` arms it believes best:

* `bf`     brute force: every arm on the same min(pool, budget / arms) examples.
* `ucb`    UCB: each round evaluate the `arms_per_round` arms with the largest mean + c * sqrt(ln t / n) on
           `samples_per_eval` fresh examples (t = 1-based round index, n = examples seen by the arm; an arm
           never pulled has an infinite bonus). The reference code counts rounds from 0, so its second round has
           ln 1 = 0 and is pure exploitation; counting from 1 and giving unpulled arms priority fixes that.
* `ucb-e`  UCB-E: the same with the bonus c * sqrt(a / n).
* `sr`     successive rejects (Audibert & Bubeck): K - keep phases; phase k pulls every surviving arm on
           max(min_samples, n_k - n_{k-1}) new examples with n_k = ceil((B - K) / (logbar(K) (K + 1 - k))),
           logbar(K) = 1/2 + sum_{i=2..K} 1/i; the worst arm is then rejected. The reference code's floor of
           `min_samples` new samples per phase can overrun the budget; here a phase never spends more than
           what is left (a phase with nothing left rejects on the samples already seen).
* `sh`     successive halving: ceil(log2 K) rounds, each pulling the survivors on floor(B / (|S| ceil(log2 K)))
           examples and dropping the arms whose running mean is below the survivors' average (never fewer
           than `keep` survive).

Ties between equal means go to the lower arm index, so results are deterministic given the rewards.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Strategy = Literal["bf", "ucb", "ucb-e", "sr", "sh"]
STRATEGIES: tuple[str, ...] = ("bf", "ucb", "ucb-e", "sr", "sh")

PullFn = Callable[[list[int], int], Awaitable[list[list[float]]]]


@dataclass(slots=True)
class ArmStats:
    sums: list[float]
    counts: list[int]

    @classmethod
    def empty(cls, n_arms: int) -> ArmStats:
        return cls([0.0] * n_arms, [0] * n_arms)

    def add(self, arm: int, rewards: Sequence[float]) -> None:
        self.sums[arm] += float(sum(rewards))
        self.counts[arm] += len(rewards)

    def mean(self, arm: int) -> float:
        return self.sums[arm] / self.counts[arm] if self.counts[arm] else 0.0

    @property
    def spent(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class BanditResult:
    # The `keep` best arms, best first.
    top: list[int]
    # Running mean and number of rewards of every arm (0 / 0 for arms never pulled).
    means: list[float]
    counts: list[int]
    # Rewards consumed and callback calls made.
    spent: int
    batches: int
    # Arms still in the race at the end (sr / sh), else every pulled arm.
    survivors: list[int] = field(default_factory=list)


class _Puller:
    """Wraps the callback: records rewards and counts calls."""

    def __init__(self, n_arms: int, pull: PullFn) -> None:
        self.stats = ArmStats.empty(n_arms)
        self.pull = pull
        self.batches = 0

    async def __call__(self, arms: list[int], k: int) -> None:
        if not arms or k <= 0:
            return
        rewards = await self.pull(list(arms), int(k))
        if len(rewards) != len(arms):
            raise ValueError(f"pull returned {len(rewards)} reward lists for {len(arms)} arms")
        self.batches += 1
        for arm, values in zip(arms, rewards, strict=True):
            self.stats.add(arm, values)

    def ranked(self, arms: Sequence[int]) -> list[int]:
        return sorted(arms, key=lambda a: (-self.stats.mean(a), a))

    def result(self, keep: int, survivors: Sequence[int] | None = None) -> BanditResult:
        stats = self.stats
        pulled = [a for a in range(len(stats.counts)) if stats.counts[a] > 0]
        pool = list(survivors) if survivors is not None else pulled
        top = self.ranked(pool)
        if len(top) < keep:  # fill from the rest (pulled first), best mean first
            rest = [a for a in self.ranked(pulled) if a not in top]
            rest += [a for a in range(len(stats.counts)) if a not in top and a not in rest]
            top += rest
        return BanditResult(
            top=top[:keep],
            means=[stats.mean(a) for a in range(len(stats.counts))],
            counts=list(stats.counts),
            spent=stats.spent,
            batches=self.batches,
            survivors=self.ranked(pool),
        )


async def brute_force(n_arms: int, keep: int, budget: int, pool_size: int, pull: PullFn) -> BanditResult:
    puller = _Puller(n_arms, pull)
    k = max(1, min(pool_size, budget // max(n_arms, 1)))
    await puller(list(range(n_arms)), k)
    return puller.result(keep)


async def ucb(
    n_arms: int,
    keep: int,
    pull: PullFn,
    rng: np.random.Generator,
    *,
    rounds: int,
    arms_per_round: int,
    samples_per_eval: int,
    c: float = 1.0,
    variant: Literal["ucb", "ucb-e"] = "ucb",
    a: float = 1.0,
) -> BanditResult:
    puller = _Puller(n_arms, pull)
    m = max(1, min(arms_per_round, n_arms))
    for t in range(1, rounds + 1):
        stats = puller.stats
        tiebreak = rng.permutation(n_arms)
        values = []
        for arm in range(n_arms):
            n = stats.counts[arm]
            if n == 0:
                values.append(math.inf)
            elif variant == "ucb":
                values.append(stats.mean(arm) + c * math.sqrt(math.log(t) / n))
            else:
                values.append(stats.mean(arm) + c * math.sqrt(a / n))
        order = sorted(range(n_arms), key=lambda i: (-values[i], int(tiebreak[i])))
        await puller(sorted(order[:m]), samples_per_eval)
    return puller.result(keep)


def _logbar(k: int) -> float:
    return 0.5 + sum(1.0 / i for i in range(2, k + 1))


def sr_schedule(n_arms: int, keep: int, budget: int, min_samples: int = 4) -> list[int]:
    """New samples per surviving arm in each successive-rejects phase (K - keep phases)."""
    phases = max(n_arms - keep, 0)
    if phases == 0:
        return []
    lb = _logbar(n_arms)
    usable = max(budget - n_arms, 0)
    previous = 0
    remaining = budget
    out = []
    for k in range(1, phases + 1):
        alive = n_arms + 1 - k
        n_k = math.ceil(usable / (lb * alive))
        new = min(max(min_samples, n_k - previous), remaining // alive)
        out.append(new)
        remaining -= new * alive
        previous += new
    return out


async def successive_rejects(
    n_arms: int, keep: int, budget: int, pull: PullFn, *, min_samples: int = 4
) -> BanditResult:
    puller = _Puller(n_arms, pull)
    alive = list(range(n_arms))
    for new in sr_schedule(n_arms, keep, budget, min_samples):
        await puller(alive, new)  # a no-op when new == 0
        worst = puller.ranked(alive)[-1]
        alive.remove(worst)
    if not puller.batches:  # nothing to reject: still measure the arms once
        await puller(alive, max(min_samples, budget // max(n_arms, 1)))
    return puller.result(keep, survivors=alive)


async def successive_halving(n_arms: int, keep: int, budget: int, pull: PullFn) -> BanditResult:
    puller = _Puller(n_arms, pull)
    alive = list(range(n_arms))
    rounds = max(1, math.ceil(math.log2(max(n_arms, 1))))
    for _ in range(rounds):
        samples = max(1, budget // (len(alive) * rounds))
        await puller(alive, samples)
        if len(alive) <= keep:
            break
        means = {a: puller.stats.mean(a) for a in alive}
        threshold = sum(means.values()) / len(means)
        kept = [a for a in alive if means[a] >= threshold]
        if len(kept) < keep:
            kept = sorted(puller.ranked(alive)[:keep])
        alive = kept
        if len(alive) <= keep:
            break
    return puller.result(keep, survivors=alive)


async def select(
    strategy: str,
    n_arms: int,
    keep: int,
    pull: PullFn,
    rng: np.random.Generator,
    *,
    budget: int,
    pool_size: int,
    eval_rounds: int,
    arms_per_round: int,
    samples_per_eval: int,
    c: float = 1.0,
    a: float = 1.0,
    min_samples: int = 4,
) -> BanditResult:
    """Run one selection; with no more arms than `keep` every strategy degrades to brute force."""
    if n_arms <= 0:
        return BanditResult([], [], [], 0, 0)
    if strategy == "bf" or n_arms <= keep:
        return await brute_force(n_arms, keep, budget, pool_size, pull)
    if strategy in ("ucb", "ucb-e"):
        return await ucb(
            n_arms,
            keep,
            pull,
            rng,
            rounds=eval_rounds,
            arms_per_round=arms_per_round,
            samples_per_eval=samples_per_eval,
            c=c,
            variant=strategy,  # type: ignore[arg-type]
            a=a,
        )
    if strategy == "sr":
        return await successive_rejects(n_arms, keep, budget, pull, min_samples=min_samples)
    if strategy == "sh":
        return await successive_halving(n_arms, keep, budget, pull)
    raise ValueError(f"unknown selection strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
