"""What the studies API answers (response bodies), importable without the methods (see `app.jobs.views`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class RunRead(BaseModel):
    job_id: str
    arm: str
    seed: int
    status: str
    test_score: float | None
    initial_test_score: float | None


class Interval(BaseModel):
    low: float
    high: float
    method: str


class Comparison(BaseModel):
    against: str = Field(description="\"initial\" (the study's initial prompt) or a baseline arm's name.")
    n: int = Field(description="Paired test examples, over every finished seed.")
    difference: float = Field(description="Mean outcome of the arm's best prompts minus the baseline's.")
    interval: Interval = Field(description="95% paired bootstrap interval of the difference.")
    p_value: float
    test: str = Field(description='"exact McNemar" (0/1 outcomes) or "paired sign-flip permutation".')
    significant: bool = Field(description="p < 0.05.")
    wins: int
    losses: int
    ties: int


class ArmResult(BaseModel):
    arm: str
    method: str
    baseline: bool = Field(description="A baseline prompt (method `evaluate`), not a search.")
    runs: int = Field(description="Runs (seeds) of this arm.")
    finished: int = Field(description="Runs with a test score.")
    test_mean: float | None
    test_sd: float | None
    test_interval: Interval | None = Field(description="95% bootstrap interval of the mean over seeds.")
    mean_llm_calls: float | None
    mean_tokens: float | None
    mean_seconds: float | None
    comparisons: list[Comparison]


class StudyRead(BaseModel):
    id: str
    name: str | None
    status: str = Field(description="queued, running, completed (every run ended) or cancelled.")
    created_at: datetime
    jobs: dict[str, int] = Field(description="Runs by status.")
    leaderboard: list[ArmResult] | None = Field(None, description="Arms, best test mean first.")
    runs: list[RunRead] | None = None
    spec: dict | None = None


class StudyPage(BaseModel):
    items: list[StudyRead]
    next_cursor: str | None
