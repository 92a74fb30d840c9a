"""What the methods, backends and readiness routes answer (importable without the methods, for the client)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class MethodRead(BaseModel):
    name: str
    description: str
    scorer_needs: list[str]
    optimizer_needs: list[str]
    parameters: dict[str, Any]
    presets: dict[str, dict[str, Any]]
    expected_calls: dict[str, int] = Field(
        description="About how many LLM calls a job makes with the default parameters (`default`) and with each "
        "preset, on a task with `n_train` training and `n_dev` dev examples: search and dev selection, plus "
        "`n_test` x 2 for the final test scoring. An estimate for setting `budget.max_llm_calls`, not a cap."
    )


class BackendRead(BaseModel):
    name: str
    kind: str
    model_id: str
    capabilities: list[str]
    max_concurrency: int
    probe_error: str | None = None
    detail: dict[str, Any] = Field(
        default_factory=dict,
        description="What this process's start-up probe found (HTTP backends: label_mode, max_logprobs, "
        "prompts_per_request, and `prompt_embeds`: the soft-prompt verdict).",
    )
    reachable: str = Field(
        description='A live health check from this process: "up", "down: <why>", or "n/a" (no cheap check).'
    )
    breaker: dict | None = Field(
        None,
        description="This process's circuit breaker for the backend (state, since, last_error, trips); null until "
        "this process sends to it. Jobs wait while it is open.",
    )


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, str] = Field(
        description='"ok" or "error: <why>" for `database` and `queue`, which make the API unready; each '
        "`backend:<name>` is reported but does not."
    )
