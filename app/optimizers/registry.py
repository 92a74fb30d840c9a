"""Method name -> optimizer class."""

from __future__ import annotations

from app.optimizers.apo import Apo
from app.optimizers.base import Optimizer
from app.optimizers.bbt import Bbt, BbtV2
from app.optimizers.claps import Claps
from app.optimizers.crosstune import CrossTune
from app.optimizers.evaluate import Evaluate
from app.optimizers.fewshot import Fewshot
from app.optimizers.opro import Opro
from app.optimizers.plum import Plum
from app.optimizers.select import Select

METHODS: dict[str, type[Optimizer]] = {
    "opro": Opro,
    "apo": Apo,
    "plum": Plum,
    "bbt": Bbt,
    "bbtv2": BbtV2,
    "claps": Claps,
    "fewshot": Fewshot,
    "evaluate": Evaluate,
    "select": Select,
    "crosstune": CrossTune,
}


def get_method(name: str) -> type[Optimizer]:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(sorted(METHODS))}") from None
