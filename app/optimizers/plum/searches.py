"""The six Plum metaheuristics (docs/methods/plum.md) as ask/tell state machines.

`await search.ask()` returns the candidates of the current phase; `search.tell(values)` takes their objective
values (higher is better) and returns True when that completed a search iteration. Most searches have one
phase per iteration; GA with crossover has two (crossover offspring, then mutation). `state_dict()` is plain
JSON; all randomness is derived from (seed, iteration, phase, index), so a restored search replays exactly.

Every search stops the same way: after `num_iterations` iterations, or when `patience` iterations in a row
brought no strict improvement (stop when the stall count exceeds the patience).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from app.optimizers.base import derived_rng
from app.optimizers.plum.edits import Cand, Draft, Editor, is_valid

ALGORITHMS = ("hill_climbing", "simulated_annealing", "genetic", "genetic_crossover", "tabu", "harmony")

# Phase tags (part of every derived key).
_PH_CHILDREN = 1
_PH_ACCEPT = 2
_PH_TOURNAMENT = 3
_PH_CROSSOVER = 4
_PH_MUTATE = 5
_PH_TABU = 6
_PH_HARMONY = 7
_SEED_SEARCH = 201


def _entry(cand: Cand, value: float) -> dict[str, Any]:
    return {"cand": cand.to_json(), "value": float(value)}


def _cand(entry: dict[str, Any]) -> Cand:
    return Cand.from_json(entry["cand"])


class Search:
    """Shared bookkeeping: iteration counter, stall count (patience), global best, pending proposals."""

    name: ClassVar[str]
    phases: ClassVar[tuple[str, ...]] = ("main",)

    def __init__(self, cfg: Any, seed: int, editor: Editor) -> None:
        self.cfg = cfg
        self.seed = seed
        self.editor = editor
        self.iteration = 0  # completed search iterations
        self.stall = 0
        self.stopped = False
        self.phase = 0
        self.best: dict[str, Any] | None = None
        self.improved = False  # within the running iteration
        self.extra: dict[str, Any] = {}
        self._asked: list[Cand] = []
        self.asked_ops: list[list[str]] = []

    # -- state --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.name,
            "iteration": self.iteration,
            "stall": self.stall,
            "stopped": self.stopped,
            "phase": self.phase,
            "best": self.best,
            "improved": self.improved,
            "extra": self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["algorithm"] != self.name:
            raise ValueError(f"state is for {state['algorithm']!r}, not {self.name!r}")
        self.iteration = int(state["iteration"])
        self.stall = int(state["stall"])
        self.stopped = bool(state["stopped"])
        self.phase = int(state["phase"])
        self.best = state["best"]
        self.improved = bool(state["improved"])
        self._load_extra(state["extra"])
        self._asked = []

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        pass

    # -- protocol -----------------------------------------------------------------------------------------

    def start(self, initial: Cand, value: float) -> None:
        """Seed the search with the (scored) initial candidate."""
        self.best = _entry(initial, value)
        self._start(initial, value)

    def _start(self, initial: Cand, value: float) -> None:
        raise NotImplementedError

    async def ask(self) -> list[Cand]:
        if self.stopped:
            raise RuntimeError("search has stopped")
        proposals = await self._ask()
        self._asked = [c for c, _ in proposals]
        self.asked_ops = [ops for _, ops in proposals]
        return list(self._asked)

    async def _ask(self) -> list[tuple[Cand, list[str]]]:
        raise NotImplementedError

    def tell(self, values: list[float]) -> bool:
        """Objective values of the last `ask`. Returns True when an iteration completed."""
        if len(values) != len(self._asked):
            raise ValueError(f"expected {len(self._asked)} values, got {len(values)}")
        cands, self._asked = self._asked, []
        for cand, value in zip(cands, values, strict=True):
            if self.best is None or value > self.best["value"]:
                self.best = _entry(cand, value)
        self._tell(cands, [float(v) for v in values])
        if self.phase + 1 < len(self.phases):
            self.phase += 1
            return False
        self.phase = 0
        self.iteration += 1
        self.stall = 0 if self.improved else self.stall + 1
        self.improved = False
        if self.iteration >= self.cfg.num_iterations or self.stall > self.cfg.patience:
            self.stopped = True
        return True

    def _tell(self, cands: list[Cand], values: list[float]) -> None:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------------------------

    def rng(self, *keys: int) -> np.random.Generator:
        return derived_rng(self.seed, _SEED_SEARCH, self.iteration, *keys)

    async def children(self, parents: list[Cand], tag: int, *keys: int) -> list[tuple[Cand, list[str]]]:
        return await self.editor.mutate(parents, [(self.iteration, tag, *keys, i) for i in range(len(parents))])

    def best_cand(self) -> tuple[Cand, float] | None:
        return None if self.best is None else (_cand(self.best), self.best["value"])


# --------------------------------------------------------------------------------------------------------------
# Hill climbing, simulated annealing, tabu search: one current candidate, m children per iteration


class HillClimbing(Search):
    name = "hill_climbing"

    def _start(self, initial: Cand, value: float) -> None:
        self.extra = {"current": _entry(initial, value)}

    def _extra_state(self) -> dict[str, Any]:
        return {"current": self.extra["current"]}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.extra = {"current": extra["current"]}

    async def _ask(self) -> list[tuple[Cand, list[str]]]:
        current = _cand(self.extra["current"])
        return await self.children([current] * self.cfg.num_candidates, _PH_CHILDREN)

    def _best_child(self, cands: list[Cand], values: list[float]) -> tuple[Cand, float] | None:
        if not cands:
            return None
        i = max(range(len(values)), key=values.__getitem__)  # ties: the first
        return cands[i], values[i]

    def _tell(self, cands: list[Cand], values: list[float]) -> None:
        found = self._best_child(cands, values)
        if found is None:
            return
        child, value = found
        if value > self.extra["current"]["value"]:
            self.extra["current"] = _entry(child, value)
            self.improved = True
        else:
            self._not_improving(child, value)

    def _not_improving(self, child: Cand, value: float) -> None:
        pass


class SimulatedAnnealing(HillClimbing):
    """HC that still accepts a worse best child with probability exp((s_child - s_current) / T),
    T = T_max * exp(-i / K)."""

    name = "simulated_annealing"

    def temperature(self, i: int) -> float:
        return self.cfg.sa_t_max * math.exp(-i / self.cfg.sa_k)

    def _not_improving(self, child: Cand, value: float) -> None:
        t = self.temperature(self.iteration)
        p = math.exp((value - self.extra["current"]["value"]) / t) if t > 0 else 0.0
        if self.rng(_PH_ACCEPT).random() < p:
            self.extra["current"] = _entry(child, value)


class Tabu(HillClimbing):
    """HC where a child on the tabu list (FIFO of the last chosen candidates, starting with the original) is
    admitted only with probability `tabu_admit_prob`; the best admissible child is pushed onto the list."""

    name = "tabu"

    def _start(self, initial: Cand, value: float) -> None:
        self.extra = {"current": _entry(initial, value), "tabu": [initial.text]}

    def _extra_state(self) -> dict[str, Any]:
        return {"current": self.extra["current"], "tabu": list(self.extra["tabu"])}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.extra = {"current": extra["current"], "tabu": list(extra["tabu"])}

    def _best_child(self, cands: list[Cand], values: list[float]) -> tuple[Cand, float] | None:
        rng = self.rng(_PH_TABU)
        order = sorted(range(len(cands)), key=lambda i: -values[i])
        tabu = self.extra["tabu"]
        for i in order:
            if cands[i].text in tabu and rng.random() >= self.cfg.tabu_admit_prob:
                continue
            tabu.append(cands[i].text)
            del tabu[: max(0, len(tabu) - self.cfg.tabu_size)]
            return cands[i], values[i]
        return None


# --------------------------------------------------------------------------------------------------------------
# Population searches


def _tournament(rng: np.random.Generator, population: list[dict[str, Any]], k: int) -> int:
    """Index of the fittest of k members drawn at random (without replacement; ties: the first drawn)."""
    k = max(1, min(k, len(population)))
    drawn = [int(i) for i in rng.choice(len(population), size=k, replace=False)]
    return max(drawn, key=lambda i: (population[i]["value"], -drawn.index(i)))


def _merge(population: list[dict[str, Any]], new: list[dict[str, Any]], size: int | None) -> list[dict[str, Any]]:
    """Add unseen members (by text), then keep the best `size` (stable: older members win ties)."""
    texts = {_cand(e).text for e in population}
    merged = list(population)
    for entry in new:
        text = _cand(entry).text
        if text not in texts:
            texts.add(text)
            merged.append(entry)
    merged.sort(key=lambda e: -e["value"])
    return merged if size is None else merged[:size]


class Genetic(Search):
    """GA without crossover: tournament-selected parent, m mutated children, the best child always joins the
    (growing) population."""

    name = "genetic"

    def _start(self, initial: Cand, value: float) -> None:
        self.extra = {"population": [_entry(initial, value)]}

    def _extra_state(self) -> dict[str, Any]:
        return {"population": list(self.extra["population"])}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.extra = {"population": list(extra["population"])}

    async def _ask(self) -> list[tuple[Cand, list[str]]]:
        population = self.extra["population"]
        parent = _cand(population[_tournament(self.rng(_PH_TOURNAMENT), population, self.cfg.tournament_size)])
        return await self.children([parent] * self.cfg.num_candidates, _PH_CHILDREN)

    def _tell(self, cands: list[Cand], values: list[float]) -> None:
        if not cands:
            return
        i = max(range(len(values)), key=values.__getitem__)
        best_before = max(e["value"] for e in self.extra["population"])
        self.extra["population"].append(_entry(cands[i], values[i]))
        if values[i] > best_before:
            self.improved = True


class GeneticCrossover(Search):
    """GA with phrase-level one-point crossover: N_p members; phase 1 breeds `num_offspring` children of
    tournament-selected parents, phase 2 mutates each member with probability `mutation_prob` into m children;
    after each phase the population keeps its best N_p (unseen texts only are added)."""

    name = "genetic_crossover"
    phases = ("crossover", "mutate")

    def _start(self, initial: Cand, value: float) -> None:
        self.extra = {"population": [_entry(initial, value) for _ in range(self.cfg.population_size)]}

    def _extra_state(self) -> dict[str, Any]:
        return {"population": list(self.extra["population"])}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.extra = {"population": list(extra["population"])}

    def _population_best(self) -> float:
        return max(e["value"] for e in self.extra["population"])

    def crossover(self) -> list[tuple[Cand, list[str]]]:
        population = self.extra["population"]
        rng = self.rng(_PH_CROSSOVER)
        seen = {_cand(e).text for e in population}
        out: list[tuple[Cand, list[str]]] = []
        draws = self.cfg.num_offspring * (self.editor.max_retries + 1)
        for _ in range(draws):
            if len(out) >= self.cfg.num_offspring:
                break
            a = _cand(population[_tournament(rng, population, self.cfg.crossover_tournament_size)])
            b = _cand(population[_tournament(rng, population, self.cfg.crossover_tournament_size)])
            longest = max(len(a.phrases), len(b.phrases))
            if longest == 0:
                continue
            cut = int(rng.integers(longest))
            phrases = a.phrases[:cut] + b.phrases[cut:]
            deleted = list(dict.fromkeys(d for d in a.deleted + b.deleted if d not in phrases))
            child = Cand(phrases, deleted)
            if not is_valid(child.text) or child.text in seen:
                continue
            seen.add(child.text)
            out.append((child, ["crossover"]))
        return out

    async def _ask(self) -> list[tuple[Cand, list[str]]]:
        if self.phase == 0:
            return self.crossover()
        rng = self.rng(_PH_MUTATE)
        parents: list[Cand] = []
        keys: list[tuple[int, ...]] = []
        for i, member in enumerate(self.extra["population"]):
            if rng.random() < self.cfg.mutation_prob:
                for c in range(self.cfg.num_candidates):
                    parents.append(_cand(member))
                    keys.append((self.iteration, _PH_MUTATE, i, c))
        return await self.editor.mutate(parents, keys)

    def _tell(self, cands: list[Cand], values: list[float]) -> None:
        before = self._population_best()
        new = [_entry(c, v) for c, v in zip(cands, values, strict=True)]
        self.extra["population"] = _merge(self.extra["population"], new, self.cfg.population_size)
        if self._population_best() > before:
            self.improved = True


class Harmony(Search):
    """Harmony search: memory of the best N_H candidates; each new harmony is assembled from `hs_segments`
    segments, segment j taken from a random memory member's j-th share of phrases and kept with probability
    HMCR (then pitch-adjusted by a paraphrase with probability PAR) or else edited by one random edit."""

    name = "harmony"

    def _start(self, initial: Cand, value: float) -> None:
        self.extra = {"memory": [_entry(initial, value)]}

    def _extra_state(self) -> dict[str, Any]:
        return {"memory": list(self.extra["memory"])}

    def _load_extra(self, extra: dict[str, Any]) -> None:
        self.extra = {"memory": list(extra["memory"])}

    async def _ask(self) -> list[tuple[Cand, list[str]]]:
        memory = [_cand(e) for e in self.extra["memory"]]
        ks = self.cfg.hs_segments
        editor = self.editor
        results: list[tuple[Cand, list[str]] | None] = [None] * self.cfg.num_candidates
        todo = list(range(self.cfg.num_candidates))
        for attempt in range(editor.max_retries + 1):
            if not todo:
                break
            plans: dict[int, list[Draft]] = {}
            for h in todo:
                rng = self.rng(_PH_HARMONY, h, attempt)
                segments = []
                for j in range(ks):
                    member = memory[int(rng.integers(len(memory)))]
                    n = len(member.phrases)
                    # A clean partition into ks shares (the official slice drops one phrase per segment).
                    lo, hi = (j * n) // ks, ((j + 1) * n) // ks
                    draft = Draft(Cand(member.phrases[lo:hi], list(member.deleted)))
                    key = (self.iteration, _PH_HARMONY, h, j)
                    if rng.random() < self.cfg.hs_hmcr:
                        if rng.random() < self.cfg.hs_par:
                            editor.edit(draft, key, attempt, 0, ops=["paraphrase"])
                    else:
                        editor.edit(draft, key, attempt, 0)
                    segments.append(draft)
                plans[h] = segments
            await editor.resolve([d for h in todo for d in plans[h]])
            retry = []
            for h in todo:
                segments = plans[h]
                phrases = [p for d in segments for p in d.cand.phrases]
                deleted = list(dict.fromkeys(x for d in segments for x in d.cand.deleted if x not in phrases))
                harmony = Cand(phrases, deleted)
                if any(d.failed for d in segments) or not is_valid(harmony.text):
                    retry.append(h)
                else:
                    results[h] = (harmony, [op for d in segments for op in d.ops] or ["recombine"])
            todo = retry
        return [r for r in results if r is not None]

    def _tell(self, cands: list[Cand], values: list[float]) -> None:
        before = max(e["value"] for e in self.extra["memory"])
        new = [_entry(c, v) for c, v in zip(cands, values, strict=True)]
        self.extra["memory"] = _merge(self.extra["memory"], new, self.cfg.hs_memory)
        if self.extra["memory"][0]["value"] > before:
            self.improved = True


SEARCHES: dict[str, type[Search]] = {
    cls.name: cls for cls in (HillClimbing, SimulatedAnnealing, Genetic, GeneticCrossover, Tabu, Harmony)
}


def make_search(algorithm: str, cfg: Any, seed: int, editor: Editor) -> Search:
    return SEARCHES[algorithm](cfg, seed, editor)
