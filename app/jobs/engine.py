"""The rules of a job, apart from where it runs.

A `JobPlan` is built once from a job's stored spec: the method's optimizer class and validated params, the task,
the backends, and the budget split into a search part and a reserve for the final test scoring. `JobEngine` runs
the plan: the optimizer's steps, the choice of the job's best prompt on the dev split after each step (by the
method's rule: its eligible candidates, its `dev_objective`), and the test scoring of the initial and the best
prompt at the end. It writes through a `JobSink` and knows nothing of leases, queues or databases: the worker
(`workers/runner.py`) implements the sink on the job repository, tests with a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from app.cache.flights import Flights
from app.cache.lru import LRU
from app.cache.store import CacheStore
from app.evaluation.evaluator import Evaluator, Prompt, PromptScore
from app.evaluation.splits import SplitSpec
from app.evaluation.statistics import paired_comparison, score_interval
from app.evaluation.task import Example, Task
from app.jobs.models import StopReason
from app.llm.breaker import CircuitBreaker
from app.llm.metered import MeteredLLM, OutageNotice, SendGuard
from app.llm.port import LLMBackend
from app.optimizers.base import CandidateResult, MethodParams, Optimizer, OptimizerContext, StepReport, settle
from app.optimizers.registry import METHODS
from app.usage import Budget, BudgetExhausted, TokenPrice, Usage

log = logging.getLogger(__name__)

# The best prompt may be longer than the initial one: the test reserve allows this much more instruction per example.
_RESERVE_EXTRA_PROMPT_TOKENS = 200


def task_from_spec(
    task: dict[str, Any], examples: Sequence[dict[str, str]], test_examples: Sequence[dict[str, str]] | None = None
) -> Task:
    """The evaluation task of a stored (resolved) `task` spec; `test_examples`: its `test_dataset`'s, if it has one."""
    return Task(
        examples=[Example(ex["input"], ex["target"]) for ex in examples],
        test_examples=None if test_examples is None else [Example(ex["input"], ex["target"]) for ex in test_examples],
        template=task["template"],
        metric=task["metric"],
        labels=task.get("labels"),
        verbalizer=task.get("verbalizer"),
        split=SplitSpec(**task["split"]),
        max_new_tokens=task.get("max_new_tokens") or 64,
        judge=task.get("judge"),
        calibration=task.get("calibration") or "none",
        demo_template=task.get("demo_template"),
        demo_max_chars=task.get("demo_max_chars") or 150,
    )


@dataclass(frozen=True, slots=True)
class JobPlan:
    method: type[Optimizer]
    params: MethodParams
    seed: int
    task: Task
    initial_prompt: str
    scorer_backend: str
    optimizer_backend: str
    max_llm_calls: int | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None
    max_cost: float | None = None

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        examples: Sequence[dict[str, str]],
        test_examples: Sequence[dict[str, str]] | None = None,
    ) -> JobPlan:
        method = METHODS[spec["method"]]
        caps = spec.get("budget") or {}
        return cls(
            method=method,
            params=method.params_model.model_validate(spec.get("params") or {}),
            seed=spec.get("seed", 0),
            task=task_from_spec(spec["task"], examples, test_examples),
            initial_prompt=spec["initial_prompt"],
            scorer_backend=spec["backends"]["scorer"],
            optimizer_backend=spec["backends"]["optimizer"],
            max_llm_calls=caps.get("max_llm_calls"),
            max_tokens=caps.get("max_tokens"),
            max_seconds=caps.get("max_seconds"),
            max_cost=caps.get("max_cost"),
        )

    def new_optimizer(self, state: dict[str, Any] | None = None) -> Optimizer:
        optimizer = self.method(self.params, self.seed)
        if state is not None:
            optimizer.load_state_dict(state)
        return optimizer

    def final_reserve(self, scorer: LLMBackend) -> tuple[int, int, int]:
        """(calls, prompt tokens, completion tokens) kept back from the search for scoring the initial and the best
        prompt on test."""
        test = self.task.split_examples("test")
        inputs = sum(scorer.count_tokens_upper_bound(self.task.template + ex.input) for ex in test)
        instruction = scorer.count_tokens_upper_bound(self.initial_prompt) + _RESERVE_EXTRA_PROMPT_TOKENS
        # Demonstrations the initial and the best prompt may carry on every example, on top of the instruction.
        extras = self.method.prompt_extras(self.params, self.task, self.seed) if test else ()
        instruction += sum(scorer.count_tokens_upper_bound(text) for text in extras if text)
        return 2 * len(test), 2 * inputs + len(test) * instruction, 2 * len(test) * self.task.max_new_tokens

    def search_budget(self, scorer: LLMBackend, elapsed_before: float, scorer_price: TokenPrice) -> Budget:
        calls, prompt_tokens, completion_tokens = self.final_reserve(scorer)
        tokens = prompt_tokens + completion_tokens
        cost = scorer_price.cost(prompt_tokens, completion_tokens)
        return Budget(
            max_llm_calls=None if self.max_llm_calls is None else max(0, self.max_llm_calls - calls),
            max_tokens=None if self.max_tokens is None else max(0, self.max_tokens - tokens),
            max_seconds=self.max_seconds,
            max_cost=None if self.max_cost is None else max(0.0, self.max_cost - cost),
            elapsed_before=elapsed_before,
        )

    def final_budget(self) -> Budget:
        # The whole cap: the search stopped short of it by the reserve. No time cap: the result must be scored.
        return Budget(max_llm_calls=self.max_llm_calls, max_tokens=self.max_tokens, max_cost=self.max_cost)


@dataclass(slots=True)
class SelectedPrompt:
    """The job's initial or best prompt as the engine chose it."""

    prompt: str  # the text, or a soft prompt's description
    train_score: float
    dev_score: float | None
    step: int
    # What decided the choice: the method's objective on train (which candidates reach dev) and on dev.
    train_objective: float | None = None
    dev_objective: float | None = None
    test_score: float | None = None
    # The test score's sample size, standard error and 95% interval (`statistics.score_interval`, as a dict).
    test: dict[str, Any] | None = None
    # The best prompt only: its paired comparison with the initial prompt on the same test examples.
    test_gain: dict[str, Any] | None = None
    artifact: dict[str, Any] | None = None  # soft prompts: what `prompt_from_artifact` rebuilds the prompt from

    def public(self) -> dict[str, Any]:
        """The fields a job shows as `initial` / `best`."""
        return {
            "prompt": self.prompt,
            "dev_score": self.dev_score,
            "test_score": self.test_score,
            **({} if self.test is None else {"test_" + k: v for k, v in self.test.items() if k != "mean"}),
            **({} if self.test_gain is None else {"test_gain": self.test_gain}),
            "train_score": self.train_score,
            "step": self.step,
        }

    def rank(self) -> tuple[float, float]:
        dev = self.dev_objective if self.dev_objective is not None else self.dev_score
        train = self.train_objective if self.train_objective is not None else self.train_score
        return (dev if dev is not None else float("-inf")), train

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> SelectedPrompt | None:
        if state is None:
            return None
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in state.items() if k in names})


@dataclass(slots=True)
class Selection:
    initial: SelectedPrompt | None = None
    best: SelectedPrompt | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "initial": None if self.initial is None else asdict(self.initial),
            "best": None if self.best is None else asdict(self.best),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> Selection:
        state = state or {}
        return cls(SelectedPrompt.from_state(state.get("initial")), SelectedPrompt.from_state(state.get("best")))

    def entries(self) -> list[SelectedPrompt]:
        return [e for e in (self.initial, self.best) if e is not None]


@dataclass(slots=True)
class StepRecord:
    """Everything one finished step leaves behind, written by the sink in one transaction."""

    step: int
    total_steps: int
    candidates: list[CandidateResult]
    # Candidate index -> its dev score, for the candidates scored on dev after this step.
    dev_scores: dict[int, PromptScore]
    selection: Selection
    checkpoint: dict[str, Any]
    message: str | None
    usage: Usage
    elapsed_seconds: float

    def event(self) -> dict[str, Any]:
        best = self.selection.best
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "candidates": len(self.candidates),
            "best_train_score": best.train_score if best else None,
            "best_dev_score": best.dev_score if best else None,
            "message": self.message,
            "usage": self.usage.as_dict(),
        }


class JobSink(Protocol):
    async def step_done(self, record: StepRecord) -> None:
        """Persist a finished step: its candidates and dev scores, the selection, the checkpoint, an event."""

    async def test_scored(self, selection: Selection, scores: dict[str, PromptScore]) -> None:
        """Persist the test scores of the selected prompts (keyed by prompt text or description)."""


@dataclass(slots=True)
class Phase:
    """What a running job is doing, for its progress: scoring its initial prompt (step 0), a search step, or the
    final test scoring. Its work is counted in answers (LLM calls and cache hits) since it began; `total` is how
    many it is expected to need (an estimate from the method's formula for search steps, exact for the others)."""

    name: str  # "initial" | "search" | "test"
    step: int
    total: int | None
    answers_at_start: int


@dataclass(slots=True)
class Outcome:
    stop_reason: StopReason
    selection: Selection


@dataclass(slots=True)
class _Meters:
    usage: Usage
    store: CacheStore | None
    lru: LRU | None = field(default=None)
    breaker_for: Callable[[str], CircuitBreaker] | None = None
    guard: SendGuard | None = None
    notice: OutageNotice | None = None
    cache_scope: str | None = None
    flights: Flights | None = None
    price_for: Callable[[str], TokenPrice] | None = None

    def __call__(self, backend: LLMBackend, budget: Budget) -> MeteredLLM:
        return MeteredLLM(
            backend,
            usage=self.usage,
            budget=budget,
            store=self.store,
            lru=self.lru,
            breaker=self.breaker_for(backend.name) if self.breaker_for is not None else None,
            guard=self.guard,
            notice=self.notice,
            cache_scope=self.cache_scope,
            flights=self.flights,
            price=self.price_for(backend.name) if self.price_for is not None else None,
        )


class JobEngine:
    def __init__(
        self,
        plan: JobPlan,
        sink: JobSink,
        *,
        scorer: LLMBackend,
        optimizer_llm: LLMBackend,
        usage: Usage,
        store: CacheStore | None = None,
        lru: LRU | None = None,
        elapsed_before: float = 0.0,
        checkpoint: dict[str, Any] | None = None,
        breaker_for: Callable[[str], CircuitBreaker] | None = None,
        guard: SendGuard | None = None,
        notice: OutageNotice | None = None,
        cache_scope: str | None = None,
        flights: Flights | None = None,
        price_for: Callable[[str], TokenPrice] | None = None,
        judge: LLMBackend | None = None,
    ) -> None:
        """`price_for(backend name)`: what its tokens cost (usage.cost, budget.max_cost).
        `cache_scope`: the evaluation cache's scope (the job's tenant; None: shared); `flights`: the worker's
        requests in flight, shared by its jobs (single-flight). `breaker_for(backend name)`:
        the backend's circuit breaker (jobs wait through its outages); `guard`: checked before every LLM send
        (fencing); `notice`: told when the job starts and stops waiting."""
        self.plan = plan
        self.sink = sink
        self.usage = usage
        self.optimizer = plan.new_optimizer(checkpoint["optimizer"] if checkpoint else None)
        self.selection = Selection.from_state(checkpoint["engine"] if checkpoint else None)
        self._meter = _Meters(usage, store, lru, breaker_for, guard, notice, cache_scope, flights, price_for)
        self._scorer = scorer
        scorer_price = price_for(scorer.name) if price_for is not None else TokenPrice()
        self.search_budget = plan.search_budget(scorer, elapsed_before, scorer_price)
        self._judge = judge  # grades outputs for the llm_judge metric
        self.evaluator = Evaluator(
            plan.task,
            self._meter(scorer, self.search_budget),
            judge_llm=self._meter(judge, self.search_budget) if judge is not None else None,
        )
        self.ctx = OptimizerContext(
            evaluator=self.evaluator,
            optimizer_llm=self._meter(optimizer_llm, self.search_budget),
            initial_prompt=plan.initial_prompt,
        )
        self.phase: Phase | None = None

    def _answers(self) -> int:
        return self.usage.llm_calls + self.usage.cache_hits

    def _enter(self, name: str, step: int, total: int | None) -> None:
        self.phase = Phase(name, step, total, self._answers())

    def _enter_step(self, step: int) -> None:
        """Step 0's calls are the method's `initial_calls`; the rest of its expected calls are spread evenly over
        the search steps."""
        plan = self.plan
        n_train, n_dev = len(plan.task.split_examples("train")), len(plan.task.split_examples("dev"))
        initial = plan.method.initial_calls(plan.params, n_train, n_dev)
        if step == 0:
            self._enter("initial", 0, initial)
            return
        try:
            search = plan.method.expected_calls(plan.params, n_train, n_dev) - initial
        except NotImplementedError:
            search = None
        steps = max(1, self.total_steps)
        self._enter("search", step, None if search is None else max(1, round(search / steps)))

    def phase_progress(self) -> dict[str, Any] | None:
        """The current phase as a job shows it: name, step, answers done and expected (done may pass an
        estimated total)."""
        if self.phase is None:
            return None
        phase = self.phase
        done = self._answers() - phase.answers_at_start
        return {"name": phase.name, "step": phase.step, "done": done, "total": phase.total}

    @property
    def total_steps(self) -> int:
        # A method may only know its step count once it has seen the model (BBTv2: one step per layer).
        return self.optimizer.total_steps

    def elapsed(self) -> float:
        return self.search_budget.elapsed()

    async def run(self) -> Outcome:
        """Search until the method is done or a budget runs out, then score the test split. Cancellation and
        errors propagate to the caller, which owns the job's state."""
        self.search_budget.start()
        stop_reason = StopReason.COMPLETED
        # Step k's dev selection and checkpoint run while step k+1 already searches (the search does not depend on
        # them); they finish in step order.
        finishing: asyncio.Task | None = None
        try:
            while not self.optimizer.done:
                self.search_budget.check_time()
                self._enter_step(self.optimizer.steps_done)
                report = await self.optimizer.step(self.ctx)
                checkpoint = copy.deepcopy(self.optimizer.state_dict())  # before the next step moves it on
                if finishing is not None:
                    await finishing  # a budget hit in its dev scoring, or a failed write, surfaces here
                finishing = asyncio.create_task(self._finish_step(report, checkpoint), name=f"step-{report.step}")
            if finishing is not None:
                await finishing
        except BudgetExhausted as exc:
            if finishing is not None:  # the step before still gets its selection and checkpoint
                with contextlib.suppress(BudgetExhausted):
                    await finishing
            log.info("search stopped: %s", exc)
            stop_reason = StopReason.BUDGET
        except BaseException as exc:
            # The attempt ends; the next one resumes from the last checkpoint written. The step before finishes its
            # dev scoring unless the job is being cancelled, so requests it sent are answered and charged.
            if finishing is not None:
                await settle([finishing], exc)
            raise
        await self._score_test()
        await self.evaluator.llm.flush()  # every answer stored and charged before the job can be marked finished
        return Outcome(stop_reason, self.selection)

    async def _finish_step(self, report: StepReport, checkpoint: dict[str, Any]) -> None:
        """Dev selection for the step, then its checkpoint, once its answers are stored and charged (a checkpoint
        never claims work whose usage could still be lost). Raises BudgetExhausted after saving if dev scoring
        found the budget spent."""
        budget_hit, dev_scores = await self._select(report)
        record = self._record(report, dev_scores, checkpoint)
        await self.evaluator.llm.flush()
        await self.sink.step_done(record)
        if budget_hit:
            raise BudgetExhausted("max_llm_calls")

    async def _select(self, report: StepReport) -> tuple[bool, dict[int, PromptScore]]:
        """Model selection on the dev split: the step's leader among the eligible candidates is scored on dev when
        its train objective could beat the best so far, and becomes the best if its dev objective is higher (ties:
        train objective). Step 0's leader is the job's initial prompt. Returns (budget ran out, dev scores)."""
        eligible = [i for i, c in enumerate(report.candidates) if c.eligible]
        if not eligible or not report.select:
            return False, {}
        method = self.plan.method
        index = (
            report.leader
            if report.leader is not None
            else max(eligible, key=lambda i: method.train_objective(report.candidates[i]))
        )
        if index not in eligible:
            raise ValueError(f"{method.method}: step {report.step} nominated a candidate that is not eligible")
        leader = report.candidates[index]
        train_objective = method.train_objective(leader)
        best = self.selection.best
        if best is not None and train_objective < best.rank()[1]:
            return False, {}
        try:
            (dev,) = await self.evaluator.score([leader.scoring_prompt or leader.prompt], "dev")
        except BudgetExhausted:
            return True, {}
        entry = SelectedPrompt(
            prompt=leader.prompt,
            train_score=leader.score,
            dev_score=dev.score,
            step=report.step,
            train_objective=train_objective,
            dev_objective=method.dev_objective(dev, self.plan.task, self.plan.task.split_examples("dev")),
            artifact=leader.artifact,
        )
        if self.selection.initial is None:
            self.selection.initial = replace(entry)
        if best is None or entry.rank() > best.rank():
            self.selection.best = entry
        return False, {index: dev}

    def _record(
        self, report: StepReport, dev_scores: dict[int, PromptScore], optimizer_state: dict[str, Any]
    ) -> StepRecord:
        return StepRecord(
            step=report.step,
            total_steps=self.total_steps,
            candidates=report.candidates,
            dev_scores=dev_scores,
            selection=Selection.from_state(self.selection.to_state()),  # a snapshot: the next step moves on
            checkpoint={"optimizer": optimizer_state, "engine": self.selection.to_state()},
            message=report.message,
            usage=replace(self.usage),
            elapsed_seconds=self.elapsed(),
        )

    async def _score_test(self) -> None:
        """The test split, scored once, for the initial and the best prompt, from the budget's reserve."""
        entries = self.selection.entries()
        if not entries or not self.plan.task.split_examples("test"):
            return  # no test split asked for: test scores stay null
        prompts: dict[str, Prompt] = {}
        for entry in entries:
            prompts[entry.prompt] = (
                self.plan.method.prompt_from_artifact(entry.artifact) if entry.artifact else entry.prompt
            )
        self._enter(
            "test", max(0, self.optimizer.steps_done - 1), len(prompts) * len(self.plan.task.split_examples("test"))
        )
        final_budget = self.plan.final_budget()
        self.evaluator.llm = self._meter(self._scorer, final_budget)
        if self._judge is not None:
            self.evaluator.judge_llm = self._meter(self._judge, final_budget)
        try:
            scores = {s.prompt: s for s in await self.evaluator.score(list(prompts.values()), "test")}
        except BudgetExhausted:
            log.warning("no budget left to score the test split")
            return
        for entry in entries:
            entry.test_score = scores[entry.prompt].score
            entry.test = score_interval(scores[entry.prompt].per_example).as_dict()
        initial, best = self.selection.initial, self.selection.best
        if initial is not None and best is not None:
            gain = paired_comparison(
                scores[best.prompt].per_example, scores[initial.prompt].per_example, self.plan.seed
            )
            keep = ("n", "difference", "low", "high", "p_value", "test", "wins", "losses", "ties")
            best.test_gain = {k: v for k, v in gain.as_dict().items() if k in keep}
        await self.evaluator.llm.flush()
        await self.sink.test_scored(self.selection, scores)
