"""All SQL about jobs. Worker writes are fenced by the attempt number (`attempts`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import utcnow
from app.jobs.models import Artifact, Candidate, CandidateEvaluation, Checkpoint, Job, JobEvent, JobStatus
from app.pagination import decode_cursor, encode_cursor, newest_first
from app.usage import Usage
from app.webhooks.repository import WebhookRepository

TERMINAL_STATUSES = {JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value}


class LeaseLost(Exception):
    """This attempt no longer owns the job (another attempt took over, or the job was finished)."""


@dataclass(slots=True)
class NewCandidate:
    step: int
    prompt: str
    prompt_hash: str
    score: float
    details: dict
    # split -> (score, n) evaluated this step beyond the scoring split
    evaluations: dict[str, tuple[float, int]]


@dataclass(slots=True)
class NewArtifact:
    prompt_hash: str
    kind: str
    model_id: str
    data: dict


class JobRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    # --- API side -----------------------------------------------------------------------------

    async def add(self, job: Job) -> Job:
        self.session.add(job)
        await self.session.flush()
        return job

    async def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        query = sa.select(Job).where(Job.id == job_id)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        return (await self.session.execute(query)).scalar_one_or_none()

    async def list(
        self, *, tenant: str | None, status: str | None, method: str | None, limit: int, cursor: str | None
    ) -> tuple[list[Job], str | None]:
        """`tenant` None: every tenant's jobs."""
        query = sa.select(Job)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        if status:
            query = query.where(Job.status == status)
        if method:
            query = query.where(Job.method == method)
        return await newest_first(self.session, query, Job, limit=limit, cursor=cursor)

    async def of_studies(self, study_ids: Sequence[str]) -> list[Job]:
        query = sa.select(Job).where(Job.study_id.in_(list(study_ids))).order_by(Job.study_arm, Job.created_at, Job.id)
        return list((await self.session.execute(query)).scalars())

    async def test_outcomes(self, job_ids: Sequence[str]) -> dict[tuple[str, str], list[float]]:
        """Per (job id, prompt hash): the per-example test outcomes stored for that prompt."""
        query = (
            sa.select(Candidate.job_id, Candidate.prompt_hash, CandidateEvaluation.outcomes)
            .join(CandidateEvaluation, CandidateEvaluation.candidate_id == Candidate.id)
            .where(
                Candidate.job_id.in_(list(job_ids)),
                CandidateEvaluation.split == "test",
                CandidateEvaluation.outcomes.is_not(None),
            )
        )
        return {(job_id, digest): outcomes for job_id, digest, outcomes in await self.session.execute(query)}

    async def recent_finished(self, tenant: str, scorer_backend: str, *, limit: int) -> list[Job]:
        """The tenant's latest succeeded jobs that made LLM calls, on this scorer backend."""
        query = (
            sa.select(Job)
            .where(Job.tenant == tenant, Job.status == JobStatus.SUCCEEDED, Job.llm_calls > 0)
            .order_by(Job.finished_at.desc())
            .limit(limit * 5)
        )
        rows = (await self.session.execute(query)).scalars()
        return [job for job in rows if job.spec.get("backends", {}).get("scorer") == scorer_backend][:limit]

    async def count_active(self, tenant: str) -> int:
        query = sa.select(sa.func.count()).where(
            Job.tenant == tenant, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])
        )
        return int((await self.session.execute(query)).scalar_one())

    async def llm_calls_since(self, tenant: str, since: datetime) -> int:
        """LLM calls charged so far to the tenant's jobs created at or after `since`."""
        query = sa.select(sa.func.coalesce(sa.func.sum(Job.llm_calls), 0)).where(
            Job.tenant == tenant, Job.created_at >= since
        )
        return int((await self.session.execute(query)).scalar_one())

    async def request_cancel(self, job_id: str) -> None:
        await self.session.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .values(cancel_requested=True)
        )

    async def cancel_if_queued(self, job_id: str) -> bool:
        """A queued job is cancelled at once; a running one by its worker."""
        result = await self.session.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(status=JobStatus.CANCELLED, stop_reason="cancelled", finished_at=utcnow(), cancel_requested=True)
        )
        return result.rowcount == 1

    async def add_event(self, job_id: str, type_: str, data: dict) -> None:
        """Record an event; a job's end (and each step, if asked for) also queues its webhook delivery, in the
        same transaction."""
        self.session.add(JobEvent(job_id=job_id, type=type_, data=data))
        terminal = type_ == "state" and data.get("status") in TERMINAL_STATUSES
        if terminal or type_ == "step":
            await self._queue_webhook(job_id, "terminal" if terminal else "step", type_, data)

    async def _queue_webhook(self, job_id: str, kind: str, type_: str, data: dict) -> None:
        job = await self.session.get(Job, job_id, populate_existing=True)
        target = (job.spec or {}).get("webhook") if job is not None else None
        if not target or kind not in target.get("events", ["terminal"]):
            return
        event = f"job.{data['status']}" if kind == "terminal" else "job.step"
        payload = {
            "event": event,
            "job_id": job.id,
            "tenant": job.tenant,
            "method": job.method,
            "status": job.status if kind == "step" else data["status"],
            "stop_reason": job.stop_reason,
            "step": job.step,
            "best": job.best,
            "usage": {"llm_calls": job.llm_calls, "prompt_tokens": job.prompt_tokens,
                      "completion_tokens": job.completion_tokens, "cost": job.cost},
            "data": data,
            "sent_for": type_,
        }  # fmt: skip
        WebhookRepository(self.session).add(job.id, event, target["url"], payload)

    async def events_after(self, job_id: str, after_id: int, limit: int = 500) -> list[JobEvent]:
        query = (
            sa.select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.id > after_id)
            .order_by(JobEvent.id)
            .limit(limit)
        )
        return list((await self.session.execute(query)).scalars())

    async def candidates(
        self, job_id: str, *, order: str, limit: int, cursor: str | None
    ) -> tuple[list[tuple[Candidate, dict[str, float]]], str | None]:
        query = sa.select(Candidate).where(Candidate.job_id == job_id)
        if order == "score":
            if cursor:
                score, cand_id = decode_cursor(cursor)
                query = query.where(
                    sa.or_(Candidate.score < score, sa.and_(Candidate.score == score, Candidate.id > cand_id))
                )
            query = query.order_by(Candidate.score.desc(), Candidate.id)
        else:
            if cursor:
                (cand_id,) = decode_cursor(cursor)
                query = query.where(Candidate.id > cand_id)
            query = query.order_by(Candidate.id)
        rows = list((await self.session.execute(query.limit(limit + 1))).scalars())
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            last = rows[-1]
            next_cursor = encode_cursor(last.score, last.id) if order == "score" else encode_cursor(last.id)
        evaluations: dict[int, dict[str, float]] = {row.id: {} for row in rows}
        if rows:
            evals = await self.session.execute(
                sa.select(CandidateEvaluation).where(CandidateEvaluation.candidate_id.in_(list(evaluations)))
            )
            for ev in evals.scalars():
                evaluations[ev.candidate_id][ev.split] = ev.score
        return [(row, evaluations[row.id]) for row in rows], next_cursor

    async def ranked_candidates(self, job_id: str) -> list[tuple[str, dict]]:
        """A job's candidates as (prompt, details), best first: by dev score where measured, then by train score."""
        dev = (
            sa.select(CandidateEvaluation.candidate_id, sa.func.max(CandidateEvaluation.score).label("score"))
            .where(CandidateEvaluation.split == "dev")
            .group_by(CandidateEvaluation.candidate_id)
            .subquery()
        )
        query = (
            sa.select(Candidate.prompt, Candidate.details)
            .outerjoin(dev, dev.c.candidate_id == Candidate.id)
            .where(Candidate.job_id == job_id)
            .order_by(dev.c.score.desc().nulls_last(), Candidate.score.desc(), Candidate.id)
        )
        return [(prompt, details or {}) for prompt, details in (await self.session.execute(query)).all()]

    async def counts_by_status(self) -> dict[str, int]:
        rows = await self.session.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status))
        return {status: count for status, count in rows.all()}

    # --- reconciler ---------------------------------------------------------------------------

    async def reconcilable(self, *, queued_grace_seconds: float) -> list[Job]:
        """Jobs that may have lost their queue message: queued a while, or running with a dead lease."""
        now = utcnow()
        query = sa.select(Job).where(
            sa.or_(
                sa.and_(Job.status == JobStatus.QUEUED, Job.created_at < now - timedelta(seconds=queued_grace_seconds)),
                sa.and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
            )
        )
        return list((await self.session.execute(query.limit(1000))).scalars())

    async def set_queue_key(self, job_id: str, queue_key: str) -> None:
        await self.session.execute(sa.update(Job).where(Job.id == job_id).values(queue_key=queue_key))

    # --- worker side (fenced) ---------------------------------------------------------------

    async def acquire_lease(self, job_id: str, *, worker_id: str, lease_seconds: float) -> Job | None:
        """Start a new attempt if the job is queued or its last attempt's lease expired."""
        now = utcnow()
        result = await self.session.execute(
            sa.update(Job)
            .where(
                Job.id == job_id,
                Job.cancel_requested.is_(False),
                sa.or_(
                    Job.status == JobStatus.QUEUED,
                    sa.and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
                ),
            )
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                worker_id=worker_id,
                started_at=sa.func.coalesce(Job.started_at, now),
                phase=None,
            )
            .returning(Job.id)
        )
        if result.scalar_one_or_none() is None:
            return None
        job = await self.get(job_id)
        await self.session.refresh(job)
        return job

    async def _fenced_update(self, job_id: str, attempt: int, **values) -> None:
        result = await self.session.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.RUNNING)
            .values(**values)
        )
        if result.rowcount != 1:
            raise LeaseLost(job_id)

    async def set_phase(self, job_id: str, attempt: int, phase: dict | None) -> None:
        await self._fenced_update(job_id, attempt, phase=phase)

    async def heartbeat(self, job_id: str, attempt: int, lease_seconds: float) -> None:
        await self._fenced_update(job_id, attempt, lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))

    async def schedule_retry(self, job_id: str, attempt: int, delay_seconds: float, event: dict) -> None:
        """End this attempt and let the job run again after `delay_seconds`: the lease is cut to that delay, so
        the reconciler re-enqueues the job once it expires and the next attempt resumes from the checkpoint."""
        await self._fenced_update(job_id, attempt, lease_expires_at=utcnow() + timedelta(seconds=delay_seconds))
        await self.add_event(job_id, "retry", event)

    async def count_events(self, job_id: str, type_: str) -> int:
        result = await self.session.execute(
            sa.select(sa.func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == type_)
        )
        return int(result.scalar_one())

    async def cancel_requested(self, job_id: str) -> bool:
        value = await self.session.execute(sa.select(Job.cancel_requested).where(Job.id == job_id))
        return bool(value.scalar_one_or_none())

    async def checkpoint(self, job_id: str) -> Checkpoint | None:
        return await self.session.get(Checkpoint, job_id)

    async def save_step(
        self,
        job_id: str,
        attempt: int,
        *,
        step: int,
        total_steps: int,
        candidates: Sequence[NewCandidate],
        state: dict,
        initial: dict | None,
        best: dict | None,
        elapsed_seconds: float,
        event: dict,
        artifacts: Sequence[NewArtifact] = (),
    ) -> None:
        """One transaction per optimizer step: candidates, evaluations, artifacts, checkpoint, progress, event."""
        await self._fenced_update(
            job_id,
            attempt,
            step=step,
            total_steps=total_steps,
            initial=initial,
            best=best,
            elapsed_seconds=elapsed_seconds,
        )
        for cand in candidates:
            row = Candidate(
                job_id=job_id,
                step=cand.step,
                prompt=cand.prompt,
                prompt_hash=cand.prompt_hash,
                score=cand.score,
                details=cand.details,
            )
            self.session.add(row)
            await self.session.flush()
            for split, (score, n) in cand.evaluations.items():
                self.session.add(CandidateEvaluation(candidate_id=row.id, split=split, score=score, n_examples=n))
        for artifact in artifacts:
            if await self.session.get(Artifact, (job_id, artifact.prompt_hash)) is None:
                self.session.add(
                    Artifact(
                        job_id=job_id,
                        prompt_hash=artifact.prompt_hash,
                        kind=artifact.kind,
                        model_id=artifact.model_id,
                        data=artifact.data,
                    )
                )
        existing = await self.session.get(Checkpoint, job_id)
        if existing is None:
            self.session.add(Checkpoint(job_id=job_id, step=step, attempt=attempt, state=state))
        else:
            existing.step, existing.attempt, existing.state = step, attempt, state
        await self.add_event(job_id, "step", event)

    async def artifact(self, job_id: str, prompt_hash: str) -> Artifact | None:
        return await self.session.get(Artifact, (job_id, prompt_hash))

    async def record_evaluation(
        self, job_id: str, prompt_hash: str, split: str, score: float, n: int, outcomes: list[float] | None = None
    ) -> None:
        """Attach a held-out score (and, for test, each example's outcome) to the latest candidate row with that
        prompt."""
        cand_id = (
            await self.session.execute(
                sa.select(Candidate.id)
                .where(Candidate.job_id == job_id, Candidate.prompt_hash == prompt_hash)
                .order_by(Candidate.id.desc())
                .limit(1)
            )
        ).scalar_one_or_none()
        if cand_id is None:
            return
        exists = await self.session.execute(
            sa.select(CandidateEvaluation.id).where(
                CandidateEvaluation.candidate_id == cand_id, CandidateEvaluation.split == split
            )
        )
        if exists.scalar_one_or_none() is None:
            self.session.add(
                CandidateEvaluation(candidate_id=cand_id, split=split, score=score, n_examples=n, outcomes=outcomes)
            )

    async def finish(
        self,
        job_id: str,
        attempt: int,
        *,
        status: JobStatus,
        stop_reason: str,
        initial: dict | None,
        best: dict | None,
        elapsed_seconds: float,
        error: str | None = None,
    ) -> None:
        await self._fenced_update(
            job_id,
            attempt,
            status=status,
            stop_reason=stop_reason,
            initial=initial,
            best=best,
            elapsed_seconds=elapsed_seconds,
            error=error,
            finished_at=utcnow(),
            lease_expires_at=None,
            phase=None,
        )
        await self.add_event(job_id, "state", {"status": status.value, "stop_reason": stop_reason, "error": error})

    async def charge_usage(self, job_id: str, usage: Usage) -> None:
        """Usage is charged as calls complete (not per step), so a killed attempt's spend is kept."""
        await self.session.execute(
            sa.update(Job)
            .where(Job.id == job_id)
            .values(
                llm_calls=Job.llm_calls + usage.llm_calls,
                prompt_tokens=Job.prompt_tokens + usage.prompt_tokens,
                completion_tokens=Job.completion_tokens + usage.completion_tokens,
                cache_hits=Job.cache_hits + usage.cache_hits,
                cost=Job.cost + usage.cost,
            )
        )
