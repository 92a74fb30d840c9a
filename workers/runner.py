"""Runs one attempt of a job: lease, resume from checkpoint, heartbeat, persist every step, finish.

The same runner serves SAQ workers (`python -m workers`) and the embedded in-process queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from app.datasets.repository import DatasetRepository
from app.datasets.service import resolve_examples
from app.db import Database
from app.evaluation.evaluator import Evaluator, Prompt
from app.evaluation.task import Task
from app.jobs.models import Job, JobStatus, StopReason
from app.jobs.repository import JobRepository, LeaseLost, NewArtifact, NewCandidate
from app.jobs.service import task_from_spec
from app.llm.cache_store import DurableCacheStore
from app.llm.metered import LRU, MeteredLLM
from app.llm.registry import BackendRegistry
from app.llm.usage import Budget, BudgetExhausted, Usage
from app.optimizers.base import CandidateResult, Optimizer, OptimizerContext, StepReport, instruction_hash
from app.optimizers.registry import METHODS
from app.settings import Settings

log = logging.getLogger(__name__)

Heartbeat = Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Attempt:
    """State of one attempt while it runs (not persisted as such; `engine` goes into the checkpoint)."""

    job_id: str
    attempt: int
    total_steps: int
    engine: dict = field(default_factory=lambda: {"initial": None, "best": None})
    stop_request: str | None = None  # "cancel" | "lease_lost" | "shutdown"


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
        attempt = Attempt(job_id, job.attempts, job.total_steps)
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

    async def _execute(self, job: Job, attempt: Attempt, state: dict | None, examples: list[dict]) -> None:
        spec = job.spec
        method_cls = METHODS[job.method]
        params = method_cls.params_model.model_validate(spec.get("params") or {})
        optimizer = method_cls(params, spec.get("seed", 0))
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            attempt.engine = state["engine"]

        task = task_from_spec(spec, examples)
        usage = Usage(job.llm_calls, job.prompt_tokens, job.completion_tokens, job.cache_hits)
        caps = spec.get("budget") or {}
        store = DurableCacheStore(self.db, job.id)
        scorer_backend = await self.registry.get(spec["backends"]["scorer"])
        optimizer_backend = await self.registry.get(spec["backends"]["optimizer"])

        final_calls, final_tokens = self._final_reserve(task, spec["initial_prompt"], scorer_backend)
        search_budget = Budget(
            max_llm_calls=None if caps.get("max_llm_calls") is None else max(0, caps["max_llm_calls"] - final_calls),
            max_tokens=None if caps.get("max_tokens") is None else max(0, caps["max_tokens"] - final_tokens),
            max_seconds=caps.get("max_seconds"),
            elapsed_before=job.elapsed_seconds,
        )
        search_budget.start()

        def metered(backend, budget: Budget) -> MeteredLLM:
            return MeteredLLM(backend, usage=usage, budget=budget, store=store, lru=self.lru)

        evaluator = Evaluator(task, metered(scorer_backend, search_budget))
        ctx = OptimizerContext(
            evaluator=evaluator,
            optimizer_llm=metered(optimizer_backend, search_budget),
            initial_prompt=spec["initial_prompt"],
        )
        stop_reason = StopReason.COMPLETED
        try:
            while not optimizer.done:
                search_budget.check_time()
                report = await optimizer.step(ctx)
                # A method may only know its step count once it has seen the model (BBTv2: one step per layer).
                attempt.total_steps = optimizer.total_steps
                budget_hit = await self._select(report, attempt, evaluator)
                await self._persist_step(report, attempt, optimizer.state_dict(), search_budget, usage)
                if budget_hit:
                    raise BudgetExhausted("max_llm_calls")
        except BudgetExhausted as exc:
            log.info("job %s: %s", job.id, exc)
            stop_reason = StopReason.BUDGET
        except asyncio.CancelledError:
            await self._stopped(attempt, store, search_budget)
            if attempt.stop_request == "cancel":
                return
            raise
        except LeaseLost:
            log.warning("job %s: attempt %d was fenced off", job.id, attempt.attempt)
            return
        except Exception as exc:
            log.exception("job %s failed", job.id)
            await self._finish(attempt, store, search_budget, JobStatus.FAILED, StopReason.ERROR, error=str(exc))
            return

        # Test split: scored once, at the end, for the initial and the best prompt, from a reserve of the budget.
        final_budget = Budget(max_llm_calls=caps.get("max_llm_calls"), max_tokens=caps.get("max_tokens"))
        final_budget.start()
        evaluator.llm = metered(scorer_backend, final_budget)
        try:
            await self._score_test(attempt, evaluator, method_cls)
        except BudgetExhausted:
            log.warning("job %s: no budget left to score the test split", job.id)
        except asyncio.CancelledError:
            await self._stopped(attempt, store, search_budget)
            if attempt.stop_request == "cancel":
                return
            raise
        await self._finish(attempt, store, search_budget, JobStatus.SUCCEEDED, stop_reason)

    def _final_reserve(self, task: Task, initial_prompt: str, backend) -> tuple[int, int]:
        test = task.split_examples("test")
        per_prompt = sum(
            backend.count_tokens_upper_bound(task.template + ex.input) + task.max_new_tokens for ex in test
        )
        # The best prompt may be longer than the initial one: allow 200 extra tokens of instruction per example.
        tokens = 2 * per_prompt + len(test) * (backend.count_tokens_upper_bound(initial_prompt) + 200)
        return 2 * len(test), tokens

    async def _select(self, report: StepReport, attempt: Attempt, evaluator: Evaluator) -> bool:
        """Model selection on the dev split: the step's leader (by train score) is scored on dev when it
        could beat the best so far. Returns True if the budget ran out while doing so."""
        if not report.candidates or not report.select:
            return False
        engine = attempt.engine
        if report.leader is not None:
            leader = report.candidates[report.leader]
        else:
            leader = max(report.candidates, key=lambda c: c.score)
        best = engine["best"]
        if best is not None and leader.score < best["train_score"]:
            return False
        try:
            (dev,) = await evaluator.score([leader.scoring_prompt or leader.prompt], "dev")
        except BudgetExhausted:
            return True
        leader.details["dev"] = (dev.score, dev.n)
        entry = {"prompt": leader.prompt, "train_score": leader.score, "dev_score": dev.score, "step": report.step}
        if leader.artifact is not None:
            entry["artifact"] = leader.artifact
        if engine["initial"] is None:
            engine["initial"] = dict(entry)
        if best is None or (dev.score, leader.score) > (best["dev_score"], best["train_score"]):
            engine["best"] = entry
        return False

    async def _persist_step(
        self, report: StepReport, attempt: Attempt, optimizer_state: dict, budget: Budget, usage: Usage
    ) -> None:
        candidates = [self._new_candidate(c) for c in report.candidates]
        engine = attempt.engine
        artifacts = []
        if engine["best"] is not None and engine["best"].get("artifact") is not None:
            artifact = engine["best"]["artifact"]
            artifacts.append(
                NewArtifact(
                    prompt_hash=instruction_hash(engine["best"]["prompt"]),
                    kind=artifact["method"],
                    model_id=artifact["model_id"],
                    data=artifact,
                )
            )
        event = {
            "step": report.step,
            "total_steps": attempt.total_steps,
            "candidates": len(candidates),
            "best_train_score": engine["best"]["train_score"] if engine["best"] else None,
            "best_dev_score": engine["best"]["dev_score"] if engine["best"] else None,
            "usage": usage.as_dict(),
        }
        async with self.db.transaction() as session:
            await JobRepository(session).save_step(
                attempt.job_id,
                attempt.attempt,
                step=report.step,
                total_steps=attempt.total_steps,
                candidates=candidates,
                state={"optimizer": optimizer_state, "engine": engine},
                initial=self._public(engine["initial"]),
                best=self._public(engine["best"]),
                elapsed_seconds=budget.elapsed(),
                event=event,
                artifacts=artifacts,
            )

    @staticmethod
    def _new_candidate(candidate: CandidateResult) -> NewCandidate:
        details = dict(candidate.details)
        dev = details.pop("dev", None)
        return NewCandidate(
            step=candidate.step,
            prompt=candidate.prompt,
            prompt_hash=instruction_hash(candidate.prompt),
            score=candidate.score,
            details=details,
            evaluations={"dev": dev} if dev else {},
        )

    @staticmethod
    def _public(entry: dict | None) -> dict | None:
        if entry is None:
            return None
        keys = ("prompt", "dev_score", "test_score", "train_score", "step")
        return {k: entry.get(k) for k in keys}

    async def _score_test(self, attempt: Attempt, evaluator: Evaluator, method_cls: type[Optimizer]) -> None:
        engine = attempt.engine
        entries = [e for e in (engine["initial"], engine["best"]) if e is not None]
        prompts: dict[str, Prompt] = {}
        for e in entries:
            artifact = e.get("artifact")
            prompts[e["prompt"]] = method_cls.prompt_from_artifact(artifact) if artifact else e["prompt"]
        if not prompts or not evaluator.task.indices("test"):
            return  # no test split asked for: test scores stay null
        scores = {s.prompt: s for s in await evaluator.score(list(prompts.values()), "test")}
        for entry in entries:
            entry["test_score"] = scores[entry["prompt"]].score
        async with self.db.transaction() as session:
            repo = JobRepository(session)
            for prompt, score in scores.items():
                await repo.record_evaluation(attempt.job_id, instruction_hash(prompt), "test", score.score, score.n)

    async def _finish(
        self,
        attempt: Attempt,
        store: DurableCacheStore,
        budget: Budget,
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
                    initial=self._public(attempt.engine["initial"]),
                    best=self._public(attempt.engine["best"]),
                    elapsed_seconds=budget.elapsed(),
                    error=error,
                )
        except LeaseLost:
            log.warning("job %s: attempt %d fenced off at finish", attempt.job_id, attempt.attempt)

    async def _stopped(self, attempt: Attempt, store: DurableCacheStore, budget: Budget) -> None:
        if attempt.stop_request == "cancel":
            await self._finish(attempt, store, budget, JobStatus.CANCELLED, StopReason.CANCELLED)
        elif attempt.stop_request == "shutdown":
            with contextlib.suppress(Exception):
                await store.aclose()
                async with self.db.transaction() as session:
                    await JobRepository(session).heartbeat(attempt.job_id, attempt.attempt, 0)
