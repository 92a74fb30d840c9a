"""Job tables: jobs, candidates and their evaluations, events, checkpoints."""

from __future__ import annotations

import enum
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigIntPK, UTCDateTime, utcnow


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class StopReason(enum.StrEnum):
    COMPLETED = "completed"
    BUDGET = "budget"
    CANCELLED = "cancelled"
    ERROR = "error"


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(64), default="default", index=True)
    method: Mapped[str] = mapped_column(sa.String(32), index=True)
    status: Mapped[str] = mapped_column(sa.String(16), index=True, default=JobStatus.QUEUED.value)
    stop_reason: Mapped[str | None] = mapped_column(sa.String(16))
    # The job as submitted (validated, defaults filled in).
    spec: Mapped[dict] = mapped_column(sa.JSON)
    step: Mapped[int] = mapped_column(sa.Integer, default=0)
    total_steps: Mapped[int] = mapped_column(sa.Integer, default=0)
    # While running: its phase, step, answers done and expected (`JobEngine.phase_progress`).
    phase: Mapped[dict | None] = mapped_column(sa.JSON)
    llm_calls: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    cache_hits: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    cost: Mapped[float] = mapped_column(sa.Float, default=0.0)
    elapsed_seconds: Mapped[float] = mapped_column(sa.Float, default=0.0)
    initial: Mapped[dict | None] = mapped_column(sa.JSON)
    best: Mapped[dict | None] = mapped_column(sa.JSON)
    # Lease: `attempts` is the fencing token of the current attempt; writes carry it.
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(sa.String(128))
    queue_key: Mapped[str | None] = mapped_column(sa.String(128))
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    error: Mapped[str | None] = mapped_column(sa.Text)
    # A study's run: the study and the arm's position in it (no foreign key: studies are never deleted, and the
    # column can then be added on SQLite without rebuilding the table).
    study_id: Mapped[str | None] = mapped_column(sa.String(36), index=True)
    study_arm: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (sa.Index("ix_jobs_created_at_id", "created_at", "id"),)


class Candidate(Base):
    __tablename__ = "candidates"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(sa.Integer)
    prompt: Mapped[str] = mapped_column(sa.Text)
    prompt_hash: Mapped[str] = mapped_column(sa.String(64))
    # Score on the scoring (train) split, as the optimizer saw it.
    score: Mapped[float] = mapped_column(sa.Float)
    details: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (sa.UniqueConstraint("job_id", "step", "prompt_hash", name="uq_candidates_job_step_prompt"),)


class CandidateEvaluation(Base):
    __tablename__ = "candidate_evaluations"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    candidate_id: Mapped[int] = mapped_column(sa.ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    split: Mapped[str] = mapped_column(sa.String(8))
    score: Mapped[float] = mapped_column(sa.Float)
    n_examples: Mapped[int] = mapped_column(sa.Integer)
    # Test only: each example's outcome in the split's order, for paired comparisons between prompts.
    outcomes: Mapped[list[float] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (sa.UniqueConstraint("candidate_id", "split", name="uq_candidate_evaluations_candidate_split"),)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(sa.String(32))
    data: Mapped[dict] = mapped_column(sa.JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    """The latest optimizer checkpoint of a job (one row per job, replaced after every step)."""

    __tablename__ = "checkpoints"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(sa.Integer)
    attempt: Mapped[int] = mapped_column(sa.Integer)
    state: Mapped[dict] = mapped_column(sa.JSON)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Artifact(Base):
    """A prompt that is not text (a BBT soft prompt): what `predict` needs to apply it. One row per prompt
    that became a job's best, keyed like the candidate rows, so `best.prompt` finds its artifact."""

    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    prompt_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(32))
    model_id: Mapped[str] = mapped_column(sa.String(200))
    data: Mapped[dict] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
