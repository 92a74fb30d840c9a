"""Request and response bodies of /v1/studies."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, Field, field_validator

from app.jobs.schemas import BackendsIn, BudgetIn, Strict, TaskIn, discriminated_by_method, method_models

MAX_ARMS = 20
MAX_SEEDS = 20
MAX_BASELINES = 5


class ArmBase(Strict):
    name: str | None = Field(None, min_length=1, max_length=100, description="Default: the method's name.")
    initial_prompt: str | None = Field(None, max_length=200_000, description="Default: the study's `initial_prompt`.")
    backends: BackendsIn = Field(default_factory=BackendsIn)
    budget: BudgetIn = Field(default_factory=BudgetIn, description="Per run (arm x seed).")


@cache
def arm_type() -> Any:
    """One arm: a method with its parameters (or `preset`), budget and backends."""
    return discriminated_by_method(method_models(ArmBase, "Arm"))


class StudyBudgetIn(Strict):
    max_llm_calls: int | None = Field(
        None,
        ge=1,
        description="Total over every run; each run's cap becomes at most this divided by the number of runs.",
    )


def study_create_type() -> type[BaseModel]:
    class StudyCreate(Strict):
        name: str | None = Field(None, min_length=1, max_length=200)
        task: TaskIn = Field(
            description="Shared by every run; each seed sets `split.seed`, so all arms of a seed see the same split."
        )
        initial_prompt: str | None = Field(None, max_length=200_000, description="Default: the builtin task's.")
        arms: list[arm_type()] = Field(..., min_length=1, max_length=MAX_ARMS)  # type: ignore[valid-type]
        seeds: list[int] = Field(
            default_factory=lambda: [0, 1, 2], min_length=1, max_length=MAX_SEEDS, description="One run per arm each."
        )
        baselines: list[str] = Field(
            default_factory=list,
            max_length=MAX_BASELINES,
            description="Prompts to compare against, each scored (method `evaluate`) on every seed's split. With none "
            "the comparison is against the initial prompt, which every run scores on test.",
        )
        budget: StudyBudgetIn = Field(default_factory=StudyBudgetIn)

        @field_validator("seeds")
        @classmethod
        def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
            if len(set(seeds)) != len(seeds):
                raise ValueError("seeds must be distinct")
            if any(not 0 <= s <= 2**31 - 1 for s in seeds):
                raise ValueError("seeds must be in 0..2147483647")
            return seeds

        @field_validator("baselines")
        @classmethod
        def _baseline_lengths(cls, baselines: list[str]) -> list[str]:
            if any(len(b) > 200_000 for b in baselines):
                raise ValueError("a baseline prompt has at most 200000 characters")
            return baselines

    return StudyCreate


StudyCreate = study_create_type()
