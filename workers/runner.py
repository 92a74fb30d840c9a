"""Runs one attempt of a job: lease, resume from checkpoint, heartbeat, persist every step, finish.

The same runner serves SAQ workers (`python -m workers`) and the embedded in-process queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.cache.lru import LRU
from app.cache.store import DurableCacheStore
from app.datasets.repository import DatasetRepository
from app.datasets.service import resolve_examples
from app.db import Database
from app.evaluation.evaluator import PromptScore
from app.jobs.engine import JobEngine, JobPlan, Selection, StepRecord
from app.jobs.models import JobStatus, StopReason
from app.jobs.repository import JobRepository, LeaseLost, NewArtifact, NewCandidate
from app.llm.registry import BackendRegistry
from app.optimizers.base import instruction_hash
from app.settings import Settings
from app.usage import Usage

log = logging.getLogger(__name__)

Heartbeat = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Attempt:
    """One attempt while it runs: its fencing token, and why it was asked to stop."""

    job_id: str
    attempt: int
    stop_request: str | None = None  # "cancel" | "lease_lost" | "shutdown"


class RepositorySink:
    """The engine's sink on the job repository: every write fenced by the attempt number."""

    def __init__(self, db: Database, attempt: Attempt) -> None:
        self.db = db
        self.attempt = attempt

    async def step_done(self, record: StepRecord) -> None:
        candidates = [
            NewCandidate(
                step=c.step,
                prompt=c.prompt,
                prompt_hash=instruction_hash(c.prompt),
                score=c.score,
                details=c.details,
                evaluations={"dev": (dev.score, dev.n)} if (dev := record.dev_scores.get(i)) else {},
            )
            for i, c in enumerate(record.candidates)
        ]
        best = record.selection.best
        artifacts = []
        if best is not None and best.artifact is not None:
            artifacts.append(
                NewArtifact(
                    prompt_hash=instruction_hash(best.prompt),
                    kind=best.artifact["method"],
                    model_id=best.artifact["model_id"],
                    data=best.artifact,
                )
            )
        async with self.db.transaction() as session:
            await JobRepository(session).save_step(
                self.attempt.job_id,
                self.attempt.attempt,
                step=record.step,
                total_steps=record.total_steps,
                candidates=candidates,
                state=record.checkpoint,
                initial=_public(record.selection.initial),
                best=_public(best),
                elapsed_seconds=record.elapsed_seconds,
                event=record.event(),
                artifacts=artifacts,
            )

    async def test_scored(self, selection: Selection, scores: dict[str, PromptScore]) -> None:
        async with self.db.transaction() as session:
            repo = JobRepository(session)
            for prompt, score in scores.items():
                digest = instruction_hash(prompt)
                await repo.record_evaluation(self.attempt.job_id, digest, "test", score.score, score.n)


def _public(entry) -> dict | None:
    return None if entry is None else entry.public()


class JobRunner:
    def __init__(self, db: Database, registry: BackendRegistry, settings: Settings, worker_id: str) -> None:
        self.db = db
        self.registry = registry
        self.settings = settings
        self.worker_id = worker_id
        # One in-process LRU in front of the durable cache, shared by every job of this process.
        self.lru = LRU(100_000)

    async def run(self, job_id: str, heartbeat: Heartbeat | None = None) -> None:
        queue_settings = self.settings.queue
        async with self.db.transaction() as session:
            repo = JobRepository(session)
            job = await repo.acquire_lease(job_id, worker_id=self.worker_id, lease_seconds=queue_settings.lease_seconds)
            if job is None:
                log.info("job %s: not runnable here (finished, cancelled or leased elsewhere)", job_id)
                return
            await repo.add_event(job_id, "state", {"status": JobStatus.RUNNING.value, "attempt": job.attempts})
            checkpoint = await repo.checkpoint(job_id)
            state = dict(checkpoint.state) if checkpoint is not None else None
            examples = await resolve_examples(DatasetRepository(session), job.spec["task"]["dataset"], job.tenant)
        attempt = Attempt(job_id, job.attempts)
        log.info("job %s: attempt %d starts%s", job_id, attempt.attempt, " from checkpoint" if state else "")
        main = asyncio.create_task(self._execute(job, attempt, state, examples))
        watcher = asyncio.create_task(self._watch(attempt, main, heartbeat))
        try:
            await asyncio.shield(main)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling() == 0:
                return  # the watcher stopped the attempt (lease lost); nothing else to do here
            # The worker is shutting down: hand the job back at once instead of waiting for the lease.
            attempt.stop_request = attempt.stop_request or "shutdown"
            main.cancel()
            with contextlib.suppress(BaseException):
                await main
            raise
        finally:
            watcher.cancel()

    async def _watch(self, attempt: Attempt, main: asyncio.Task, heartbeat: Heartbeat | None) -> None:
        """Renew the lease, feed the queue's heartbeat, and turn a cancel request into task cancellation."""
        queue_settings = self.settings.queue
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + queue_settings.heartbeat_seconds
        while not main.done():
            await asyncio.sleep(queue_settings.cancel_poll_seconds)
            beat_due = loop.time() >= next_beat
            try:
                async with self.db.transaction() as session:
                    repo = JobRepository(session)
                    if await repo.cancel_requested(attempt.job_id):
                        attempt.stop_request = "cancel"
                        main.cancel()
                        return
                    if beat_due:
                        await repo.heartbeat(attempt.job_id, attempt.attempt, queue_settings.lease_seconds)
                if beat_due:
                    next_beat = loop.time() + queue_settings.heartbeat_seconds
                    if heartbeat is not None:
                        await heartbeat()
            except LeaseLost:
                log.warning("job %s: attempt %d lost its lease; stopping", attempt.job_id, attempt.attempt)
                attempt.stop_request = "lease_lost"
                main.cancel()
                return
            except Exception:  # a blip in Postgres or Redis: try again on the next tick
                log.warning("job %s: heartbeat failed", attempt.job_id, exc_info=True)

    async def _execute(self, job, attempt: Attempt, state: dict | None, examples: list[dict]) -> None:
        usage = Usage(job.llm_calls, job.prompt_tokens, job.completion_tokens, job.cache_hits)

        async def charge(session, spent: Usage) -> None:
            await JobRepository(session).charge_usage(job.id, spent)

        store = DurableCacheStore(self.db, charge)
        engine: JobEngine | None = None
        try:
            plan = JobPlan.from_spec(job.spec, examples)
            engine = JobEngine(
                plan,
                RepositorySink(self.db, attempt),
                scorer=await self.registry.get(plan.scorer_backend),
                optimizer_llm=await self.registry.get(plan.optimizer_backend),
                usage=usage,
                store=store,
                lru=self.lru,
                elapsed_before=job.elapsed_seconds,
                checkpoint=state,
            )
            outcome = await engine.run()
        except asyncio.CancelledError:
            await self._stopped(attempt, store, *self._so_far(job, engine))
            if attempt.stop_request == "cancel":
                return
            raise
        except LeaseLost:
            log.warning("job %s: attempt %d was fenced off", job.id, attempt.attempt)
            return
        except Exception as exc:
            log.exception("job %s failed", job.id)
            selection, elapsed = self._so_far(job, engine)
            await self._finish(attempt, store, selection, elapsed, JobStatus.FAILED, StopReason.ERROR, error=str(exc))
            return
        await self._finish(
            attempt, store, outcome.selection, engine.elapsed(), JobStatus.SUCCEEDED, outcome.stop_reason
        )

    @staticmethod
    def _so_far(job, engine: JobEngine | None) -> tuple[Selection, float]:
        """What an attempt that stops early keeps: the engine's selection and clock, or the job's own."""
        if engine is None:
            return Selection(), job.elapsed_seconds
        return engine.selection, engine.elapsed()

    async def _finish(
        self,
        attempt: Attempt,
        store: DurableCacheStore,
        selection: Selection,
        elapsed: float,
        status: JobStatus,
        stop_reason: StopReason,
        error: str | None = None,
    ) -> None:
        await store.aclose()  # usage counters are final before the job is
        try:
            async with self.db.transaction() as session:
                await JobRepository(session).finish(
                    attempt.job_id,
                    attempt.attempt,
                    status=status,
                    stop_reason=stop_reason.value,
                    initial=_public(selection.initial),
                    best=_public(selection.best),
                    elapsed_seconds=elapsed,
                    error=error,
                )
        except LeaseLost:
            log.warning("job %s: attempt %d fenced off at finish", attempt.job_id, attempt.attempt)

    async def _stopped(self, attempt: Attempt, store: DurableCacheStore, selection: Selection, elapsed: float) -> None:
        if attempt.stop_request == "cancel":
            await self._finish(attempt, store, selection, elapsed, JobStatus.CANCELLED, StopReason.CANCELLED)
        elif attempt.stop_request == "shutdown":
            with contextlib.suppress(Exception):
                await store.aclose()
                async with self.db.transaction() as session:
                    await JobRepository(session).heartbeat(attempt.job_id, attempt.attempt, 0)
