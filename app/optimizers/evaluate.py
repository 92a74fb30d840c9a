"""`evaluate`: no search. The initial prompt is scored on train, dev and test like any job's, which makes it a
study's baseline (the same splits and per-example test outcomes as the arms it is compared with) or a quick check of
a hand-written prompt."""

from __future__ import annotations

from typing import Any, ClassVar

from app.optimizers.base import (
    MethodParams,
    Optimizer,
    OptimizerContext,
    StepReport,
    train_subset_field,
)
from app.optimizers.demonstrations import DemonstrationsParams, demonstrations_field, search_calls


class EvaluateParams(MethodParams):
    train_subset: int | None = train_subset_field()
    demonstrations: DemonstrationsParams | None = demonstrations_field()


class Evaluate(Optimizer):
    """No search: score the initial prompt on train, dev and test (a baseline)."""

    method: ClassVar[str] = "evaluate"
    params_model: ClassVar[type[MethodParams]] = EvaluateParams

    @property
    def total_steps(self) -> int:
        return 0

    @classmethod
    def expected_calls(cls, params: EvaluateParams, n_train: int, n_dev: int, num_layers: int = 30) -> int:
        size = cls.scoring_set_size(params, n_train)
        return size + n_dev + search_calls(params, size)

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        raise RuntimeError("evaluate has no search steps")

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass
