"""What the jobs API answers (response bodies). Kept apart from the request models, which need every method's
parameter model, so that the Python client can use these without importing the methods."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class Progress(BaseModel):
    step: int = Field(description="The last step saved (0: the initial prompt scored).")
    total_steps: int
    fraction: float = Field(
        description="Overall, 0 to 1: the initial scoring, each search step and the final test scoring count as one "
        "part each; the part in progress counts by its answers done of expected."
    )
    phase: str = Field(
        "queued",
        description="queued; while running: initial (scoring the initial prompt), search (a search step) or test "
        "(scoring the initial and best prompts on test); finished once the job has ended.",
    )
    phase_step: int | None = Field(None, description="While running: the step the phase belongs to.")
    phase_done: int | None = Field(None, description="While running: LLM answers (calls and cache hits) in this phase.")
    phase_total: int | None = Field(
        None,
        description="While running: the answers the phase is expected to need (exact for initial and test, the "
        "method's estimate for a search step, which `phase_done` may pass).",
    )


class UsageOut(BaseModel):
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    cache_hits: int
    cost: float = Field(0.0, description="From the backends' prices (0 where none is configured).")


class GainOverInitial(BaseModel):
    """The best prompt against the initial one on the same test examples (paired)."""

    n: int
    difference: float = Field(description="Best minus initial: the mean of the per-example differences.")
    low: float = Field(description="95% paired-bootstrap interval of the difference, lower end.")
    high: float = Field(description="95% paired-bootstrap interval of the difference, upper end.")
    p_value: float = Field(description="Two-sided: exact McNemar for 0/1 outcomes, else a sign-flip permutation.")
    test: str
    wins: int = Field(description="Examples the best prompt got right (scored higher on) and the initial did not.")
    losses: int
    ties: int


class PromptResult(BaseModel):
    prompt: Any
    dev_score: float | None = None
    test_score: float | None = None
    test_n: int | None = Field(None, description="Test examples the test score is the mean over.")
    test_stderr: float | None = Field(None, description="The test score's standard error.")
    test_low: float | None = Field(None, description="The test score's 95% interval, lower end.")
    test_high: float | None = Field(None, description="The test score's 95% interval, upper end.")
    test_method: str | None = Field(
        None, description='How the interval was computed: "wilson" (0/1 outcomes) or "normal".'
    )
    test_gain: GainOverInitial | None = Field(
        None, description="The best prompt only: its gain over the initial on test."
    )
    train_score: float | None = None
    step: int | None = None


class JobRead(BaseModel):
    id: str
    tenant: str
    method: str
    status: str
    stop_reason: str | None
    progress: Progress
    usage: UsageOut
    initial: PromptResult | None
    best: PromptResult | None
    attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict | None = Field(None, description="The job as submitted, defaults filled in.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Set on submission only (also kept as `warning` events): e.g. a budget too small to finish.",
    )


class JobPage(BaseModel):
    items: list[JobRead]
    next_cursor: str | None


class CandidateRead(BaseModel):
    id: int
    step: int
    prompt: str
    score: float
    dev_score: float | None
    test_score: float | None
    # Method-specific facts about the candidate (e.g. its loss, generation, layer, edit operations).
    details: dict = Field(default_factory=dict)
    created_at: datetime


class CandidatePage(BaseModel):
    items: list[CandidateRead]
    next_cursor: str | None


class Prediction(BaseModel):
    input: str
    output: str


class PredictOut(BaseModel):
    prompt: str
    predictions: list[Prediction]


class SecondsRange(BaseModel):
    low: float
    high: float


class JobEstimate(BaseModel):
    """What a job would cost before it runs (POST /v1/jobs/estimate): a dry run of the submission."""

    expected_llm_calls: int = Field(
        description="The method's expected calls for its parameters and the split sizes (search and dev selection), "
        "plus 2 x the test split; duplicates and cache hits make the real count lower."
    )
    expected_tokens: int
    tokens_basis: str = Field(description="Where tokens per call came from: earlier jobs, or the text's length.")
    expected_cost: float = Field(description="expected_tokens at the scorer backend's price (0 when it has none).")
    seconds: SecondsRange | None = Field(
        description="From the calls per second of this tenant's recent finished jobs on the same scorer backend "
        "(fastest and slowest); null before there are any."
    )
    split: dict[str, int] = Field(description="Examples in train, dev and test.")
    warnings: list[str] = Field(default_factory=list)


class WebhookDeliveryRead(BaseModel):
    id: int
    event: str = Field(description="job.succeeded, job.failed, job.cancelled or job.step")
    url: str
    status: str = Field(description="pending (not yet sent, or to be retried), delivered, or failed (gave up)")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None
    created_at: datetime
