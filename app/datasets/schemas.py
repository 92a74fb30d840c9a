from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class ExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str = Field(..., min_length=1, max_length=100_000)
    target: str = Field(..., max_length=100_000)


DatasetName = Annotated[str, Field(min_length=1, max_length=200)]


class DatasetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: DatasetName
    examples: list[ExampleIn] = Field(..., min_length=1, max_length=1_000_000)


class TaskDefaults(BaseModel):
    template: str
    metric: str
    labels: list[str] | None
    verbalizer: dict[str, str] | None
    initial_prompt: str
    max_new_tokens: int


class DatasetRead(BaseModel):
    id: str
    tenant: str | None = Field(None, description="The owner (None for builtin tasks).")
    name: str
    source: str
    n_examples: int
    created_at: datetime | None = None
    description: str | None = None
    license: str | None = None
    defaults: TaskDefaults | None = Field(None, description="Suggested task settings (builtin tasks).")
    examples: list[ExampleIn] = Field(default_factory=list, description="The first `examples_limit` examples.")


class DatasetPage(BaseModel):
    items: list[DatasetRead]
    next_cursor: str | None
