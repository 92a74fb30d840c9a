"""CMA-ES (the `cma` package) behind an ask/tell wrapper whose state is a short JSON replay log.

The `cma` object itself pickles to about 4 MB at d = 500 (BBTv2 keeps one per layer), so a checkpoint stores
what determines it instead: its settings, and the losses told for every generation. Each generation draws its
samples from a generator seeded by (job seed, search key, generation), so restoring re-runs ask/tell on the
logged losses and rebuilds the same object, sample for sample, without calling the model.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.optimizers.base import derived_rng, derived_seed

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "could not import matplotlib": plotting is not used
    import cma


@contextlib.contextmanager
def _global_numpy_seed(seed: int):
    """Seed numpy's global generator for code we do not control, and put the caller's state back after."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclass(slots=True)
class CmaSettings:
    dim: int
    sigma: float
    popsize: int
    seed: int
    key: tuple[int, ...]  # distinguishes the searches of one job (BBTv2: one per layer)
    bound: float = 0.0  # > 0: search inside [-bound, bound]^dim


class CmaSearch:
    """Minimises a loss over R^dim: `ask()` a population, `tell()` its losses."""

    def __init__(self, settings: CmaSettings, history: list[list[float]] | None = None) -> None:
        self.settings = settings
        self.history: list[list[float]] = []
        self.best_x: np.ndarray | None = None
        self.best_loss = math.inf
        self._asked: np.ndarray | None = None
        self._generation_rng: np.random.Generator | None = None
        opts: dict[str, Any] = {
            "popsize": settings.popsize,
            "seed": float("nan"),  # sampling goes through `randn` below, never numpy's global seed
            "randn": self._randn,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "verb_filenameprefix": "",
        }
        if settings.bound > 0:
            opts["bounds"] = [-settings.bound, settings.bound]
        with _global_numpy_seed(derived_seed(settings.seed, *settings.key, 0)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.es = cma.CMAEvolutionStrategy(np.zeros(settings.dim), settings.sigma, opts)
        for losses in history or ():
            self.tell(self.ask(), losses)

    @property
    def generation(self) -> int:
        return len(self.history)

    def _randn(self, *shape: int) -> np.ndarray:
        assert self._generation_rng is not None, "sampling outside ask()"
        return self._generation_rng.standard_normal(shape)

    def ask(self) -> np.ndarray:
        """The next population, shape (popsize, dim); asking again before `tell` returns the same one."""
        if self._asked is None:
            generation = self.generation + 1
            self._generation_rng = derived_rng(self.settings.seed, *self.settings.key, generation)
            with _global_numpy_seed(derived_seed(self.settings.seed, *self.settings.key, generation)):
                self._asked = np.asarray(self.es.ask(), dtype=np.float64)
            self._generation_rng = None
        return self._asked

    def tell(self, solutions: np.ndarray, losses: list[float]) -> None:
        if self._asked is None or solutions is not self._asked:
            raise ValueError("tell() takes the population the last ask() returned")
        losses = [float(v) for v in losses]
        with _global_numpy_seed(derived_seed(self.settings.seed, *self.settings.key, self.generation + 1, 1)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.es.tell(list(solutions), losses)
        self.history.append(losses)
        i = int(np.argmin(losses))
        if losses[i] < self.best_loss:
            self.best_loss = losses[i]
            self.best_x = np.array(solutions[i], dtype=np.float64)
        self._asked = None

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.history]}

    @classmethod
    def restore(cls, settings: CmaSettings, state: dict[str, Any]) -> CmaSearch:
        return cls(settings, history=state["history"])
