"""Method name -> optimizer class."""

from __future__ import annotations

from app.optimizers.apo import Apo
from app.optimizers.base import Optimizer
from app.optimizers.opro import Opro

METHODS: dict[str, type[Optimizer]] = {"opro": Opro, "apo": Apo}


def get_method(name: str) -> type[Optimizer]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}") from None
