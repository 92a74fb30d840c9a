"""Runs one attempt of a job: lease, resume from checkpoint, heartbeat, persist every step, finish.

The same runner serves SAQ workers (`python -m workers`) and the embedded in-process queue.

Faults (docs/design.md, "Faults"): a transient fault (backend down longer than its breaker waits, database
unreachable longer than `db_outage_seconds`, no progress for `stall_seconds`) ends the attempt and schedules
another from the last checkpoint after a jittered exponential delay, up to `max_attempts`; any other error
fails the job with a coded message. Shorter database outages are ridden out: writes are retried and answers
kept in memory until they can be stored. No LLM request leaves once the lease is not known to be valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime

from app.cache.flights import Flights
from app.cache.lru import LRU
from app.cache.store import DurableCacheStore
from app.datasets.repository import DatasetRepository
from app.datasets.service import resolve_task_examples
from app.db import Database, is_connection_error
from app.evaluation.evaluator import PromptScore
from app.jobs.engine import JobEngine, JobPlan, Selection, StepRecord
from app.jobs.faults import AttemptStalled, Fault, classify, retry_delay
from app.jobs.models import JobStatus, StopReason
from app.jobs.repository import JobRepository, LeaseLost, NewArtifact, NewCandidate
from app.llm.port import SendRefused
from app.llm.registry import BackendRegistry
from app.metrics import ATTEMPTS, ATTEMPTS_ENDED, LEASE_LOSSES, RETRIES, STALLED, job_finished
from app.optimizers.base import instruction_hash
from app.settings import Settings
from app.usage import Usage

log = logging.getLogger(__name__)

Heartbeat = Callable[[], Awaitable[None]]


# The lease is trusted locally until this long (at most a quarter of the lease) before it would expire, counted
# from the last renewal's send time: covers the clock drift between this host and the database's view.
LEASE_SAFETY_SECONDS = 2.0


class LeaseClock:
    """What this process knows about its lease, by the monotonic clock: valid until `valid_until` (counted from
    when the last successful renewal was sent), or lost. The job's MeteredLLMs await it before every batch and
    call `gate` before every request."""

    def __init__(self, job_id: str, lease_seconds: float, acquired_at: float) -> None:
        self.job_id = job_id
        self.safety = min(LEASE_SAFETY_SECONDS, lease_seconds / 4)
        self.valid_until = acquired_at + lease_seconds - self.safety
        self.lost = False
        self._changed = asyncio.Event()

    def renewed(self, sent_at: float, lease_seconds: float) -> None:
        self.valid_until = sent_at + lease_seconds - self.safety
        self._changed.set()

    def mark_lost(self) -> None:
        self.lost = True
        self._changed.set()

    def gate(self) -> None:
        """Before each single request: refuse at once unless the lease is known valid now."""
        if self.lost or time.monotonic() >= self.valid_until:
            raise SendRefused(self.job_id)

    async def __call__(self) -> None:
        """Before each batch: return once the lease is known valid; raise LeaseLost once it is lost."""
        while True:
            if self.lost:
                raise LeaseLost(self.job_id)
            if time.monotonic() < self.valid_until:
                return
            # Not known valid (a renewal failed, or this process was paused): wait for the next renewal's verdict.
            self._changed.clear()
            await self._changed.wait()


@dataclass(slots=True)
class Progress:
    """When the attempt last got an LLM answer or wrote to the database; deliberate waits (a backend outage) do
    not count as stalls."""

    last: float = field(default_factory=time.monotonic)
    waiting: int = 0
    answers_seen: int = -1

    def touch(self) -> None:
        self.last = time.monotonic()

    def stalled_for(self, answers: int) -> float:
        if answers != self.answers_seen:
            self.answers_seen = answers
            self.touch()
        return 0.0 if self.waiting else time.monotonic() - self.last


@dataclass(slots=True)
class Attempt:
    """One attempt while it runs: its fencing token, its lease as this process knows it, its progress, and why
    it was asked to stop."""

    job_id: str
    attempt: int
    lease: LeaseClock
    progress: Progress = field(default_factory=Progress)
    usage: Usage | None = None  # the job's usage while the engine runs (answers received count as progress)
    phase: Callable[[], dict | None] | None = None  # the engine's current phase (`JobEngine.phase_progress`)
    stop_request: str | None = None  # "cancel" | "lease_lost" | "shutdown" | "stalled"
    method: str = ""  # for the job-duration metric: the job's method, and when its first attempt started
    started_at: datetime | None = None


async def ride_out_outage(db: Database, attempt: Attempt, outage_seconds: float, write) -> None:
    """Run `write(session)` in a transaction, retrying while the database is unreachable, for at most
    `outage_seconds`; then the connection error is raised (a transient fault). LeaseLost is never retried."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + outage_seconds
    delay = 0.2
    while True:
        try:
            async with db.transaction() as session:
                await write(session)
            attempt.progress.touch()
            return
        except Exception as exc:
            if not is_connection_error(exc) or loop.time() + delay > deadline:
                raise
            log.warning("job %s: database unreachable; retrying the write in %.1fs", attempt.job_id, delay)
            attempt.progress.waiting += 1
            try:
                await asyncio.sleep(delay)
            finally:
                attempt.progress.waiting -= 1
            delay = min(delay * 2, 5.0)


class RepositorySink:
    """The engine's sink on the job repository: every write fenced by the attempt number, retried through a
    database outage of up to `outage_seconds`."""

    def __init__(self, db: Database, attempt: Attempt, outage_seconds: float) -> None:
        self.db = db
        self.attempt = attempt
        self.outage_seconds = outage_seconds

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

        async def write(session) -> None:
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

        await ride_out_outage(self.db, self.attempt, self.outage_seconds, write)
        usage = record.usage
        log.info(
            "job %s: step %d/%d saved: %d candidates, best dev %s, %d LLM calls, %d cache hits, %.1fs",
            self.attempt.job_id,
            record.step,
            record.total_steps,
            len(record.candidates),
            "-" if best is None or best.dev_score is None else f"{best.dev_score:.3f}",
            usage.llm_calls,
            usage.cache_hits,
            record.elapsed_seconds,
        )

    async def test_scored(self, selection: Selection, scores: dict[str, PromptScore]) -> None:
        async def write(session) -> None:
            repo = JobRepository(session)
            for prompt, score in scores.items():
                digest = instruction_hash(prompt)
                await repo.record_evaluation(
                    self.attempt.job_id, digest, "test", score.score, score.n, score.per_example
                )

        await ride_out_outage(self.db, self.attempt, self.outage_seconds, write)


PHASE_WRITE_SECONDS = 1.0


def _phase_key(phase: dict | None) -> tuple | None:
    return None if phase is None else (phase["name"], phase["step"])


def describe_phase(phase: dict) -> str:
    expected = f"~{phase['total']}" if phase["name"] == "search" and phase["total"] else phase["total"]
    what = {
        "initial": "scoring the initial prompt",
        "search": f"step {phase['step']}",
        "test": "scoring the initial and best prompts on test",
    }.get(phase["name"], phase["name"])
    return f"{what} ({expected if expected is not None else '?'} answers expected)"


def _result_summary(selection: Selection) -> str:
    parts = []
    for label, entry in (("initial", selection.initial), ("best", selection.best)):
        if entry is not None and entry.test_score is not None:
            parts.append(f"{label} test {entry.test_score:.3f}")
        elif entry is not None and entry.dev_score is not None:
            parts.append(f"{label} dev {entry.dev_score:.3f}")
    return "; " + ", ".join(parts) if parts else ""


def _public(entry) -> dict | None:
    return None if entry is None else entry.public()


class JobRunner:
    def __init__(
        self,
        db: Database,
        registry: BackendRegistry,
        settings: Settings,
        worker_id: str,
        flights: Flights | None = None,
    ) -> None:
        """`flights`: requests in flight, shared by this worker's jobs (and by other workers' where shared)."""
        self.db = db
        self.registry = registry
        self.settings = settings
        self.worker_id = worker_id
        # One in-process LRU in front of the durable cache, shared by every job of this process.
        self.lru = LRU(100_000)
        self.flights = flights or Flights()
        self._event_tasks: set[asyncio.Task] = set()  # outage events being written (kept referenced)

    async def run(self, job_id: str, heartbeat: Heartbeat | None = None) -> None:
        queue_settings = self.settings.queue
        acquired_at = time.monotonic()
        async with self.db.transaction() as session:
            repo = JobRepository(session)
            job = await repo.acquire_lease(job_id, worker_id=self.worker_id, lease_seconds=queue_settings.lease_seconds)
            if job is None:
                log.info("job %s: not runnable here (finished, cancelled or leased elsewhere)", job_id)
                return
            await repo.add_event(job_id, "state", {"status": JobStatus.RUNNING.value, "attempt": job.attempts})
            checkpoint = await repo.checkpoint(job_id)
            state = dict(checkpoint.state) if checkpoint is not None else None
            examples = await resolve_task_examples(DatasetRepository(session), job.spec["task"], job.tenant)
        attempt = Attempt(job_id, job.attempts, LeaseClock(job_id, queue_settings.lease_seconds, acquired_at))
        attempt.method, attempt.started_at = job.method, job.started_at or job.created_at
        ATTEMPTS.labels(resumed=str(state is not None).lower()).inc()
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
        """Renew the lease, feed the queue's heartbeat, turn a cancel request into task cancellation, and end an
        attempt that makes no progress."""
        queue_settings = self.settings.queue
        loop = asyncio.get_running_loop()
        next_beat = next_queue_beat = loop.time() + queue_settings.heartbeat_seconds
        failing = False
        written_phase: dict | None = None
        next_phase_write = 0.0
        while not main.done():
            await asyncio.sleep(queue_settings.cancel_poll_seconds)
            if heartbeat is not None and loop.time() >= next_queue_beat:
                # The queue's heartbeat says "this message is being worked on"; it goes on through a database
                # outage (the lease in the job row is what decides who may run the job).
                next_queue_beat = loop.time() + queue_settings.heartbeat_seconds
                try:
                    await heartbeat()
                except Exception:
                    log.warning("job %s: queue heartbeat failed", attempt.job_id, exc_info=True)
            # Renew at the usual cadence, and at once whenever the lease is no longer known valid (after a failed
            # renewal or a pause of this process), so a blocked send learns its fate within a tick.
            beat_due = loop.time() >= next_beat or time.monotonic() >= attempt.lease.valid_until
            sent_at = time.monotonic()
            try:
                async with self.db.transaction() as session:
                    repo = JobRepository(session)
                    if await repo.cancel_requested(attempt.job_id):
                        attempt.stop_request = "cancel"
                        main.cancel()
                        return
                    if beat_due:
                        await repo.heartbeat(attempt.job_id, attempt.attempt, queue_settings.lease_seconds)
                    # The phase's progress, at most once a second (at once when the phase changes).
                    phase = attempt.phase() if attempt.phase is not None else None
                    if phase != written_phase and (
                        loop.time() >= next_phase_write or _phase_key(phase) != _phase_key(written_phase)
                    ):
                        await repo.set_phase(attempt.job_id, attempt.attempt, phase)
                        if phase is not None and _phase_key(phase) != _phase_key(written_phase):
                            log.info("job %s: %s", attempt.job_id, describe_phase(phase))
                        written_phase, next_phase_write = phase, loop.time() + PHASE_WRITE_SECONDS
                if beat_due:
                    attempt.lease.renewed(sent_at, queue_settings.lease_seconds)
                    next_beat = loop.time() + queue_settings.heartbeat_seconds
                if failing:
                    log.warning("job %s: database reachable again", attempt.job_id)
                failing = False
            except LeaseLost:
                log.warning("job %s: attempt %d lost its lease; stopping", attempt.job_id, attempt.attempt)
                LEASE_LOSSES.inc()
                attempt.stop_request = "lease_lost"
                attempt.lease.mark_lost()
                main.cancel()
                return
            except Exception:  # Postgres or Redis unreachable: try again on the next tick
                if not failing:
                    log.warning("job %s: heartbeat failed; retrying every tick", attempt.job_id, exc_info=True)
                failing = True
            usage = attempt.usage
            answers = usage.llm_calls + usage.cache_hits if usage is not None else 0
            if attempt.progress.stalled_for(answers) > queue_settings.stall_seconds:
                log.warning(
                    "job %s: no progress for %.0fs; ending the attempt", attempt.job_id, queue_settings.stall_seconds
                )
                attempt.stop_request = "stalled"
                main.cancel()
                return

    def _notice(self, attempt: Attempt):
        """The engine's outage notice: a job event, and the stall watchdog paused while the job waits."""

        def notice(kind: str, data: dict) -> None:
            if kind == "backend_down":
                attempt.progress.waiting += 1
            elif kind == "backend_up":
                attempt.progress.waiting = max(0, attempt.progress.waiting - 1)
                attempt.progress.touch()
            task = asyncio.get_running_loop().create_task(self._event(attempt, kind, data))
            self._event_tasks.add(task)
            task.add_done_callback(self._event_tasks.discard)

        return notice

    async def _event(self, attempt: Attempt, kind: str, data: dict) -> None:
        try:
            async with self.db.transaction() as session:
                await JobRepository(session).add_event(attempt.job_id, kind, data)
        except Exception:
            log.warning("job %s: could not record a %s event", attempt.job_id, kind, exc_info=True)

    async def _execute(
        self, job, attempt: Attempt, state: dict | None, examples: tuple[list[dict], list[dict] | None]
    ) -> None:
        """`examples`: the task's, and its test dataset's (None without one)."""
        queue_settings = self.settings.queue
        usage = Usage(job.llm_calls, job.prompt_tokens, job.completion_tokens, job.cache_hits, job.cost)
        attempt.usage = usage

        async def charge(session, spent: Usage) -> None:
            await JobRepository(session).charge_usage(job.id, spent)

        store = DurableCacheStore(
            self.db, charge, outage_seconds=queue_settings.db_outage_seconds, on_write=attempt.progress.touch
        )
        engine: JobEngine | None = None
        try:
            plan = JobPlan.from_spec(job.spec, *examples)
            engine = JobEngine(
                plan,
                RepositorySink(self.db, attempt, queue_settings.db_outage_seconds),
                scorer=await self.registry.get_when_up(plan.scorer_backend),
                optimizer_llm=await self.registry.get_when_up(plan.optimizer_backend),
                usage=usage,
                store=store,
                lru=self.lru,
                elapsed_before=job.elapsed_seconds,
                checkpoint=state,
                breaker_for=self.registry.breaker,
                guard=attempt.lease,
                notice=self._notice(attempt),
                cache_scope=job.tenant if self.settings.cache_scope == "tenant" else None,
                flights=self.flights,
                price_for=self.registry.price,
                judge=await self.registry.get_when_up(plan.task.judge["backend"]) if plan.task.judge else None,
            )
            attempt.phase = engine.phase_progress
            outcome = await engine.run()
        except asyncio.CancelledError:
            if attempt.stop_request == "stalled":
                STALLED.inc()
                stalled = AttemptStalled(f"no LLM answer and no database write for {queue_settings.stall_seconds:g}s")
                await self._end_attempt(attempt, store, classify(stalled), *self._so_far(job, engine))
                return
            await self._stopped(attempt, store, *self._so_far(job, engine))
            if attempt.stop_request == "cancel":
                return
            raise
        except LeaseLost:
            log.warning("job %s: attempt %d was fenced off", job.id, attempt.attempt)
            LEASE_LOSSES.inc()
            return
        except Exception as exc:
            fault = classify(exc)
            if fault.transient:
                log.warning("job %s: attempt %d ended by a transient fault: %s", job.id, attempt.attempt, exc)
                await self._end_attempt(attempt, store, fault, *self._so_far(job, engine))
            else:
                log.exception("job %s failed", job.id)
                selection, elapsed = self._so_far(job, engine)
                await self._finish(
                    attempt, store, selection, elapsed, JobStatus.FAILED, StopReason.ERROR, error=fault.error_text()
                )
            return
        await self._finish(
            attempt, store, outcome.selection, engine.elapsed(), JobStatus.SUCCEEDED, outcome.stop_reason
        )

    async def _end_attempt(
        self, attempt: Attempt, store: DurableCacheStore, fault: Fault, selection: Selection, elapsed: float
    ) -> None:
        """A transient fault: schedule another attempt from the checkpoint, or fail once attempts run out. With
        the database down nothing can be written: the lease then expires on its own and the job is retried."""
        queue_settings = self.settings.queue
        ATTEMPTS_ENDED.labels(cause=fault.code).inc()
        with contextlib.suppress(Exception):
            await store.aclose()  # keep what was answered (and its usage) if the database lets us
        try:
            async with self.db.transaction() as session:
                repo = JobRepository(session)
                retries = await repo.count_events(attempt.job_id, "retry")
                if retries + 1 >= queue_settings.max_attempts:
                    error = f"retries_exhausted: {retries + 1} attempts ended by faults; last {fault.error_text()}"
                    await repo.finish(
                        attempt.job_id,
                        attempt.attempt,
                        status=JobStatus.FAILED,
                        stop_reason=StopReason.ERROR.value,
                        initial=_public(selection.initial),
                        best=_public(selection.best),
                        elapsed_seconds=elapsed,
                        error=error,
                    )
                    job_finished(attempt.method, JobStatus.FAILED, attempt.started_at)
                    return
                delay = retry_delay(retries, queue_settings.retry_base_seconds, queue_settings.retry_max_seconds)
                await repo.schedule_retry(
                    attempt.job_id,
                    attempt.attempt,
                    delay,
                    {
                        "cause": fault.code,
                        "error": fault.message[:500],
                        "attempt": attempt.attempt,
                        "retry_in_s": round(delay, 2),
                    },
                )
            RETRIES.labels(cause=fault.code).inc()
            log.warning(
                "job %s: attempt %d ended (%s); retry in %.1fs", attempt.job_id, attempt.attempt, fault.code, delay
            )
        except LeaseLost:
            log.warning("job %s: attempt %d fenced off while ending", attempt.job_id, attempt.attempt)
        except Exception:
            log.warning("job %s: could not schedule a retry; its lease will expire", attempt.job_id, exc_info=True)

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

        async def write(session) -> None:
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

        try:
            await ride_out_outage(self.db, attempt, self.settings.queue.db_outage_seconds, write)
            job_finished(attempt.method, status, attempt.started_at)
            log.info(
                "job %s: %s (%s) after %.1fs%s",
                attempt.job_id,
                status.value,
                stop_reason.value,
                elapsed,
                _result_summary(selection),
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
