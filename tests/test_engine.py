"""The job engine on its own: no Postgres, no Redis, an in-memory sink, a scripted backend at the LLM boundary.

The backend answers label requests from keywords in the instruction: "good" is right on every example, "bad" on
none, "overfit" only on the training examples, anything else on every other example.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, ClassVar

import pytest

from app.evaluation.evaluator import PromptScore
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.jobs.engine import JobEngine, JobPlan, Selection, StepRecord
from app.jobs.models import StopReason
from app.llm.port import BackendInfo, Capability, LabelScores
from app.optimizers.base import CandidateResult, MethodParams, Optimizer, OptimizerContext, StepReport
from app.optimizers.claps import Claps
from app.optimizers.plum import Plum, PlumParams
from app.usage import Usage

LABELS = ["yes", "no"]
TEMPLATE = "{prompt}\nItem: {input}\nAnswer:"


def make_task(n: int = 24) -> Task:
    examples = [Example(f"item {i}", LABELS[i % 2]) for i in range(n)]
    split = SplitSpec(train=0.5, dev=0.25, test=0.25, seed=0)
    return Task(examples=examples, template=TEMPLATE, metric="label_accuracy", labels=LABELS, split=split)


class KeywordScorer:
    name = "keywords"

    def __init__(self, task: Task) -> None:
        self.info = BackendInfo(self.name, "test", "keywords-1", frozenset({Capability.LABEL_LOGPROBS}))
        self.train = {ex.input for ex in task.split_examples("train")}
        self.sent = 0

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.split()) + 1

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            instruction, _, rest = request.prompt.partition("\nItem: ")
            item = rest.split("\n")[0]
            index = int(re.match(r"item (\d+)", item).group(1))
            gold = index % 2
            if "good" in instruction:
                right = True
            elif "bad" in instruction:
                right = False
            elif "overfit" in instruction:
                right = item in self.train
            else:
                right = index % 4 < 2
            predicted = gold if right else 1 - gold
            scores = LabelScores([0.0 if j == predicted else -5.0 for j in range(2)], prompt_tokens=3)
            self.sent += 1
            if on_result is not None:
                on_result(i, scores)
            out.append(scores)
        return out


class ScriptParams(MethodParams):
    # Per step: the prompts to propose, "!" in front marks a candidate the method does not want returned.
    script: list[list[str]] = []


class Scripted(Optimizer):
    """A method that proposes the prompts of its script, one list per step."""

    method: ClassVar[str] = "scripted"
    params_model: ClassVar[type[MethodParams]] = ScriptParams
    params: ScriptParams

    @property
    def total_steps(self) -> int:
        return len(self.params.script)

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: dict[str, Any]) -> None:
        pass

    async def score_prompts(self, ctx: OptimizerContext, prompts, step, examples) -> list[CandidateResult]:
        scores = await ctx.evaluator.score(prompts, "train", examples)
        return [CandidateResult(s.prompt, s.score, step) for s in scores]

    async def search_step(self, ctx: OptimizerContext, step: int) -> StepReport:
        wanted = self.params.script[step - 1]
        results = await self.score_prompts(ctx, [p.lstrip("!") for p in wanted], step, self.scoring_examples(ctx))
        for result, text in zip(results, wanted, strict=True):
            result.eligible = not text.startswith("!")
        return StepReport(step, results, message=f"step {step}: {len(results)} proposals")


class ListSink:
    def __init__(self, fail_after_steps: int | None = None) -> None:
        self.steps: list[StepRecord] = []
        self.tests: list[dict[str, PromptScore]] = []
        self.fail_after_steps = fail_after_steps

    async def step_done(self, record: StepRecord) -> None:
        if self.fail_after_steps is not None and len(self.steps) >= self.fail_after_steps:
            raise ConnectionError("the worker died")
        self.steps.append(record)

    async def test_scored(self, selection: Selection, scores: dict[str, PromptScore]) -> None:
        self.tests.append(scores)


def make_plan(script: list[list[str]], method: type[Optimizer] = Scripted, params=None, **caps) -> JobPlan:
    return JobPlan(
        method=method,
        params=params if params is not None else ScriptParams(script=script),
        seed=0,
        task=make_task(),
        initial_prompt="Answer.",
        scorer_backend="keywords",
        optimizer_backend="keywords",
        **caps,
    )


def make_engine(plan: JobPlan, sink: ListSink, checkpoint=None, usage: Usage | None = None) -> JobEngine:
    backend = KeywordScorer(plan.task)
    return JobEngine(plan, sink, scorer=backend, optimizer_llm=backend, usage=usage or Usage(), checkpoint=checkpoint)


async def test_best_is_chosen_on_dev_and_test_is_scored_once_for_initial_and_best() -> None:
    sink = ListSink()
    engine = make_engine(make_plan([["overfit"], ["good"], ["bad"]]), sink)
    outcome = await engine.run()

    assert outcome.stop_reason == StopReason.COMPLETED
    initial, best = outcome.selection.initial, outcome.selection.best
    task = make_task()

    def plain_rate(split: str) -> float:  # how a prompt without keywords scores: right on index % 4 < 2
        items = task.split_examples(split)
        return sum(int(ex.input.split()[1]) % 4 < 2 for ex in items) / len(items)

    assert (initial.prompt, initial.train_score, initial.dev_score) == (
        "Answer.",
        plain_rate("train"),
        plain_rate("dev"),
    )
    # "overfit" is perfect on train and wrong on dev: it never becomes the best
    assert (best.prompt, best.step, best.train_score, best.dev_score) == ("good", 2, 1.0, 1.0)
    assert (initial.test_score, best.test_score) == (plain_rate("test"), 1.0)
    assert len(sink.tests) == 1 and set(sink.tests[0]) == {"Answer.", "good"}

    assert [r.step for r in sink.steps] == [0, 1, 2, 3]
    assert [r.event()["message"] for r in sink.steps[1:]] == [f"step {i}: 1 proposals" for i in (1, 2, 3)]
    # dev scores travel with the step that caused them: the leader when it could beat the best
    assert [sorted(r.dev_scores) for r in sink.steps] == [[0], [0], [0], []]
    assert sink.steps[-1].checkpoint["engine"]["best"]["prompt"] == "good"
    assert sink.steps[-1].usage.llm_calls < engine.usage.llm_calls  # test scoring came after the last step


async def test_ineligible_candidates_are_never_returned() -> None:
    sink = ListSink()
    outcome = await make_engine(make_plan([["!good", "bad"], ["!good"]]), sink).run()
    assert outcome.selection.best.prompt == "Answer."
    assert [c.prompt for c in sink.steps[1].candidates] == ["good", "bad"]
    assert sink.steps[2].dev_scores == {}  # nothing eligible: nothing scored on dev


async def test_a_nominated_ineligible_leader_is_a_bug() -> None:
    class Nominates(Scripted):
        async def search_step(self, ctx, step):
            report = await super().search_step(ctx, step)
            report.leader = 0
            return report

    with pytest.raises(ValueError, match="not eligible"):
        await make_engine(make_plan([["!good", "bad"]], method=Nominates), ListSink()).run()


async def test_the_method_decides_what_wins_on_dev() -> None:
    class PrefersLowDev(Scripted):
        @classmethod
        def dev_objective(cls, score, task, examples):
            return -score.score

        @classmethod
        def train_objective(cls, candidate):
            return -candidate.score

    outcome = await make_engine(make_plan([["good"], ["bad"]], method=PrefersLowDev), ListSink()).run()
    assert outcome.selection.best.prompt == "bad"


def test_plum_selects_on_its_objective_not_on_accuracy() -> None:
    # 5 "yes" and 1 "no" on dev: A answers "yes" everywhere (accuracy 5/6, balanced accuracy 0.5, one label used);
    # B gets 3 of the yes and the no right (accuracy 4/6, balanced accuracy 0.8, both labels used).
    task = make_task(8)
    dev = [Example(f"item {i}", "yes") for i in range(5)] + [Example("item 5", "no")]
    a = PromptScore("a", "dev", 5 / 6, [1.0] * 5 + [0.0], ["yes"] * 6)
    b = PromptScore("b", "dev", 4 / 6, [1.0, 1.0, 1.0, 0.0, 0.0, 1.0], ["yes", "yes", "yes", "no", "no", "no"])
    assert a.score > b.score
    assert Plum.dev_objective(b, task, dev) > Plum.dev_objective(a, task, dev)
    cand = CandidateResult("x", 0.9, 1, {"objective": 42.0})
    assert Plum.train_objective(cand) == 42.0 and Optimizer.train_objective(cand) == 0.9
    assert PlumParams(scoring_subset=5).train_subset == 5  # the former name still validates


async def test_budget_stops_the_search_and_keeps_the_test_reserve() -> None:
    sink = ListSink()
    plan = make_plan([["good"], ["bad"], ["overfit"], ["good x"]], max_llm_calls=60)
    engine = make_engine(plan, sink)
    outcome = await engine.run()
    assert outcome.stop_reason == StopReason.BUDGET
    assert engine.usage.llm_calls <= 60
    n_test = len(plan.task.split_examples("test"))
    assert outcome.selection.best.test_score is not None and len(sink.tests[0]) == 2
    assert plan.final_reserve(KeywordScorer(plan.task))[0] == 2 * n_test


async def test_resume_from_a_checkpoint_equals_an_uninterrupted_run() -> None:
    script = [["bad"], ["overfit"], ["good"], ["bad good"]]
    whole = ListSink()
    expected = await make_engine(make_plan(script), whole).run()

    crashed = ListSink(fail_after_steps=2)
    usage = Usage()
    with pytest.raises(ConnectionError):
        await make_engine(make_plan(script), crashed, usage=usage).run()
    resumed = ListSink()
    outcome = await make_engine(make_plan(script), resumed, checkpoint=crashed.steps[-1].checkpoint).run()

    assert outcome.selection.to_state() == expected.selection.to_state()
    steps = [(r.step, [c.prompt for c in r.candidates]) for r in crashed.steps + resumed.steps]
    assert steps == [(r.step, [c.prompt for c in r.candidates]) for r in whole.steps]


async def test_selection_state_of_older_checkpoints_still_loads() -> None:
    old = {
        "initial": {"prompt": "Answer.", "train_score": 0.5, "dev_score": 0.5, "step": 0},
        "best": {"prompt": "good", "train_score": 1.0, "dev_score": 0.9, "step": 2, "artifact": None},
    }
    selection = Selection.from_state(old)
    assert selection.best.rank() == (0.9, 1.0) and selection.best.public()["test_score"] is None
    assert replace(selection.best, dev_objective=0.1).rank() == (0.1, 1.0)


async def test_claps_never_returns_a_pruning_word_or_the_empty_prompt() -> None:
    from tests.test_claps import FakeScorer, clusters_of, make_params
    from tests.test_claps import make_task as claps_task

    class SingleWordsWin(FakeScorer):
        """Single helpful words are the best prompts there are; every 2-word string is wrong everywhere."""

        async def label_logprobs(self, requests, on_result=None):
            out = await super().label_logprobs(requests)
            for i, (request, scores) in enumerate(zip(requests, out, strict=True)):
                if len(clusters_of(request.prompt.partition("\nText: ")[0])) >= 2:
                    scores.logprobs = [-scores.logprobs[0], -scores.logprobs[1], -scores.logprobs[2]]
                if on_result is not None:
                    on_result(i, scores)
            return out

    params = make_params(prompt_length=2, percentile=50.0)
    plan = JobPlan(Claps, params, 0, claps_task(), "Classify the text.", "fake-claps", "fake-claps")
    backend = SingleWordsWin()
    sink = ListSink()
    outcome = await JobEngine(plan, sink, scorer=backend, optimizer_llm=backend, usage=Usage()).run()
    best = outcome.selection.best
    assert best.prompt == "Classify the text." or len(clusters_of(best.prompt)) == 2
    pruning_words = [c.prompt for r in sink.steps for c in r.candidates if c.details.get("phase") == "prune"]
    assert pruning_words and best.prompt not in pruning_words
    for record in sink.steps:
        for index in record.dev_scores:
            candidate = record.candidates[index]
            assert candidate.eligible and candidate.prompt != ""
            assert candidate.details["phase"] in ("greedy", "genetic") or candidate.details.get("origin") == "initial"


@pytest.mark.parametrize("search", ["greedy", "genetic"])
async def test_expected_calls_match_a_real_run(search: str) -> None:
    """The estimate behind /v1/methods and the submit warning, against the calls a ClaPS run really makes."""
    from tests.test_claps import FakeScorer, make_params
    from tests.test_claps import make_task as claps_task

    params = make_params(search=search, percentile=50.0)
    plan = JobPlan(Claps, params, 0, claps_task(), "Classify the text.", "fake-claps", "fake-claps")
    backend = FakeScorer()
    usage = Usage()
    await JobEngine(plan, ListSink(), scorer=backend, optimizer_llm=backend, usage=usage).run()
    task = plan.task
    n_train, n_dev, n_test = (len(task.split_examples(s)) for s in ("train", "dev", "test"))
    expected = Claps.expected_calls(params, n_train, n_dev) + 2 * n_test
    # an upper bound that is not loose: only repeated strings and skipped dev checks make a run cheaper
    assert 0.7 * expected <= usage.llm_calls + usage.cache_hits <= expected
