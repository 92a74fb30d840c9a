"""Demonstrations in prompts: rendering, drawing, leaving the scored example out, nearest-neighbour prompts and their
artifacts; the `fewshot` method's successive halving; OPRO, APO and Plum carrying a fixed set; the test reserve; and
jobs through the API on the fake server (predict reproduces the dev score)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from app.datasets.builtin import BUILTIN_TASKS
from app.evaluation import demonstrations as demos
from app.evaluation.demonstrations import (
    FixedDemonstrations,
    NearestDemonstrations,
    compose,
    demonstrations_of,
    pick_demonstrations,
    render_demonstration,
)
from app.evaluation.evaluator import Evaluator, PromptScore, prompt_name
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.jobs.engine import JobEngine, JobPlan, task_from_spec
from app.jobs.models import StopReason
from app.llm.port import BackendInfo, Capability, LabelScores
from app.optimizers.apo import Apo, ApoParams
from app.optimizers.base import OptimizerContext
from app.optimizers.demonstrations import DemonstrationsParams
from app.optimizers.evaluate import Evaluate, EvaluateParams
from app.optimizers.fewshot import (
    Fewshot,
    FewshotParams,
    interleaved_order,
    keep_best,
    round_sizes,
    survivor_plan,
)
from app.optimizers.opro import Opro, OproParams
from app.optimizers.plum import Plum, PlumParams
from app.optimizers.registry import METHODS
from app.usage import Usage
from tests.conftest import label_job, wait_for_status
from tests.test_apo import SMALL as APO_SMALL
from tests.test_apo import ScriptedOptimizerLLM as ApoScriptedLLM
from tests.test_engine import ListSink
from tests.test_opro import ScriptedOptimizerLLM

LABELS = ["yes", "no"]
TEMPLATE = "{prompt}\nItem: {input}\nAnswer:"


def make_task(n: int = 48, **split) -> Task:
    examples = [Example(f"item {i}", LABELS[i % 2]) for i in range(n)]
    spec = SplitSpec(**{"train": 0.5, "dev": 0.25, "test": 0.25, "seed": 0, **split})
    return Task(examples=examples, template=TEMPLATE, metric="label_accuracy", labels=list(LABELS), split=spec)


def items(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"item (\d+)", text)]


def word_embedder(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for the sentence model: hashed bag of words, L2-normalised."""
    out = np.zeros((len(texts), 32), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 32] += 1.0
        out[row] /= np.linalg.norm(out[row]) or 1.0
    return out


@pytest.fixture
def fake_embeddings(monkeypatch):
    monkeypatch.setattr(demos, "default_embedder", word_embedder)
    monkeypatch.setattr(demos, "embedding_model_id", lambda: "test-words")


class DemoScorer:
    """Label scorer over "Item: item N" prompts (gold: N even -> yes). With `demos_help`, a prompt that shows any
    demonstration is right and one without is wrong; otherwise right or wrong by a hash of the whole prompt. Records
    every prompt."""

    name = "demo"

    def __init__(self, demos_help: bool = False) -> None:
        self.info = BackendInfo("demo", "test", "demo-1", frozenset({Capability.LABEL_LOGPROBS}))
        self.demos_help = demos_help
        self.prompts: list[str] = []

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.split()) + 1

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            self.prompts.append(request.prompt)
            found = items(request.prompt)
            query, shown = found[-1], found[:-1]
            gold = query % 2
            digest = int(hashlib.md5(request.prompt.encode()).hexdigest(), 16)
            right = bool(shown) if self.demos_help else digest % 3 != 0
            predicted = gold if right else 1 - gold
            tokens = self.count_tokens_upper_bound(request.prompt)
            scores = LabelScores([0.0 if j == predicted else -5.0 for j in range(2)], tokens, completion_tokens=1)
            if on_result is not None:
                on_result(i, scores)
            out.append(scores)
        return out


# ---------------------------------------------------------------------------------------------------------
# Rendering


def test_a_demonstration_is_the_query_with_its_answer_and_its_input_is_cut():
    task = make_task()
    assert render_demonstration(task, Example("item 7 " + "x" * 300, "no")) == "Item: item 7 " + "x" * 143 + (
        "\nAnswer: no"
    )
    task.demo_max_chars = 7
    assert render_demonstration(task, Example("item 7 is long", "yes")) == "Item: item 7\nAnswer: yes"
    assert render_demonstration(task, Example("item 7 is long", "yes"), 3) == "Item: ite\nAnswer: yes"
    # A verbalizer is the answer as it is scored; a given demo_template fills {input} and {target} literally.
    task.verbalizer = {"yes": [" Yes", " Sure"], "no": " No"}
    assert render_demonstration(task, Example("item 7 is long", "yes")) == "Item: item 7\nAnswer: Yes"
    task.demo_template = "Q: {input} -> {target} {input}"
    assert render_demonstration(task, Example("{target}", "no"), 100) == "Q: {target} -> No {target}"
    # A generation task shows the target after a space.
    gen = Task([], "{prompt}\nQ: {input}\nA:", "exact_match")
    assert render_demonstration(gen, Example("1+1?", "2")) == "Q: 1+1?\nA: 2"


def test_layouts_put_the_shared_part_first():
    assert compose("Answer.", ["d1", "d2"]) == "d1\n\nd2\n\nAnswer."
    assert compose("Answer.", ["d1", "d2"], "instruction_first") == "Answer.\n\nd1\n\nd2"
    assert compose("", ["d1"]) == "d1" and compose("Answer. ", []) == "Answer. "
    with pytest.raises(ValueError, match="layout"):
        compose("a", ["d"], "sideways")


def test_a_fixed_set_leaves_out_the_example_being_scored():
    task = make_task()
    train = task.split_examples("train")
    prompt = FixedDemonstrations("Answer.", demonstrations_of(task, [3, 0, 5]))
    assert items(prompt.text) == items(train[3].input) + items(train[0].input) + items(train[5].input)
    assert prompt.text_for(train[1]) == prompt.text
    without = prompt.text_for(train[0])
    assert items(without) == items(train[3].input) + items(train[5].input) and without.endswith("Answer.")
    evaluator = Evaluator(task, DemoScorer())
    rendered = evaluator.render(prompt, train[0])
    assert items(rendered).count(items(train[0].input)[0]) == 1  # only as the query


# ---------------------------------------------------------------------------------------------------------
# Drawing


def test_random_sets_are_stratified_and_depend_only_on_the_seed():
    task = make_task(60)
    targets = [ex.target for ex in task.split_examples("train")]
    for k in (1, 2, 3):
        drawn = pick_demonstrations(targets, LABELS, 2 * k, seed=4)
        assert sorted(targets[i] for i in drawn) == sorted(LABELS * k)
    params = FewshotParams(random_sets=6, orders=2, knn=[])
    configs = Fewshot(params, 3).demonstration_configs(task)
    assert configs == Fewshot(params, 3).demonstration_configs(task)
    assert configs != Fewshot(params, 4).demonstration_configs(task)
    assert configs[0] == {"kind": "none"} and len(configs) == 1 + 12
    drawn = [c for c in configs[1:] if c["order"] == 0]
    reordered = [c for c in configs[1:] if c["order"] == 1]
    assert [sorted(c["positions"]) for c in drawn] == [sorted(c["positions"]) for c in reordered]
    assert len({tuple(c["positions"]) for c in configs[1:]}) == 12
    # A generation task draws k examples in all.
    gen = Task([Example(f"q{i}", f"a{i}") for i in range(20)], "{prompt}\n{input}", "exact_match")
    (one,) = Fewshot(FewshotParams(random_sets=1, k_per_class=3, knn=[], zero_shot=False), 0).demonstration_configs(gen)
    assert len(one["positions"]) == 3


def test_nearest_neighbours_are_the_most_similar_without_the_example_itself(fake_embeddings):
    task = make_task()
    train = task.split_examples("train")
    positions = list(range(len(train)))
    prompt = NearestDemonstrations.from_task(task, positions, "Answer.", 3)
    query = Example("item 5", "no")  # the same words as train's "item 5" if it is there
    chosen = prompt.positions_for(query)
    similarity = word_embedder([query.input]) @ word_embedder([ex.input for ex in train]).T
    best = sorted(range(len(train)), key=lambda i: (-round(float(similarity[0, i]), 5), i))
    own = [i for i in positions if train[i] == query]
    assert chosen == list(reversed([i for i in best if i not in own][:3]))  # the most similar last
    for example in train[:6]:
        assert train.index(example) not in prompt.positions_for(example)
    assert NearestDemonstrations.from_task(task, positions, "Answer.", 3).positions_for(query) == chosen

    # The artifact rebuilds the same prompt (texts per example), without the task.
    rebuilt = Fewshot.prompt_from_artifact(prompt.to_artifact("fewshot"))
    assert isinstance(rebuilt, NearestDemonstrations) and rebuilt.description == prompt.description
    for example in task.split_examples("dev") + train[:4]:
        assert rebuilt.text_for(example) == prompt.text_for(example)


async def test_each_text_is_embedded_once_across_the_nearest_neighbour_prompts_of_a_job(monkeypatch):
    """Prompts with other k or instructions embed the same pool and inputs: each text goes to the model once, and
    the neighbours are those an uncached embedder gives."""
    seen: list[str] = []

    def counting(texts: list[str]) -> np.ndarray:
        seen.extend(texts)
        return word_embedder(texts)

    monkeypatch.setattr(demos, "default_embedder", counting)
    monkeypatch.setattr(demos, "embedding_model_id", lambda: f"test-count-{id(seen)}")
    task = make_task()
    positions = list(range(len(task.split_examples("train"))))
    prompts = [NearestDemonstrations.from_task(task, positions, i, k) for i, k in (("Answer.", 2), ("Decide.", 4))]
    dev = task.split_examples("dev")
    for prompt in prompts:
        await prompt.prepare(dev)
        await prompt.prepare(task.split_examples("test"))
    texts = [ex.input for ex in task.split_examples("train") + dev + task.split_examples("test")]
    assert sorted(seen) == sorted(set(texts))  # each once
    uncached = NearestDemonstrations.from_task(task, positions, "Decide.", 4, embedder=word_embedder)
    assert uncached.model == "custom"
    for example in dev:
        assert uncached.positions_for(example) == prompts[1].positions_for(example)


# ---------------------------------------------------------------------------------------------------------
# Successive halving


def test_halving_plan_and_round_sizes():
    assert survivor_plan(10, 0.5) == [10, 5, 3, 2]
    assert survivor_plan(6, 0.5) == [6, 3, 2]
    assert survivor_plan(10, 0.9) == [10, 9, 8, 7, 6, 5, 4, 3, 2]  # always at least one fewer
    assert survivor_plan(2, 0.5) == [2] and survivor_plan(1, 0.5) == [1]
    assert round_sizes(4, 8, 112) == [8, 16, 32, 112]
    assert round_sizes(3, 64, 100) == [64, 100, 100]
    assert keep_best([4, 1, 7, 2], [0.5, 0.9, 0.5, 0.1], 2) == [1, 4]  # ties: the lower candidate index
    order = interleaved_order(["a", "a", "a", "b", "b", "c"], ["a", "b", "c"], 0, 1)
    assert sorted(order) == list(range(6)) and len({["a", "a", "a", "b", "b", "c"][i] for i in order[:3]}) == 3


class TableEvaluator:
    """Scores each fewshot candidate from a fixed table: table[number of examples][candidate index]."""

    def __init__(self, task: Task, optimizer: Fewshot, table: dict[int, list[float]]) -> None:
        self.task, self.optimizer, self.table = task, optimizer, table
        self.rounds: list[tuple[list[int], list[Example]]] = []

    def render(self, prompt, example):
        return Evaluator(self.task, DemoScorer()).render(prompt, example)

    async def score(self, prompts, split="train", examples=None):
        if not self.optimizer.candidates:  # step 0: the initial prompt
            return [PromptScore(prompt_name(p), split, 0.0) for p in prompts]
        names = {prompt_name(self.optimizer.prompt(self.task, c)): c for c in range(len(self.optimizer.candidates))}
        indices = [names[prompt_name(p)] for p in prompts]
        self.rounds.append((indices, list(examples)))
        scores = self.table[len(examples)]
        return [PromptScore(prompt_name(p), split, scores[c]) for p, c in zip(prompts, indices, strict=True)]


async def test_successive_halving_keeps_the_best_of_each_round_on_more_examples():
    task = make_task(48)  # 24 train
    optimizer = Fewshot(FewshotParams(random_sets=5, knn=[], first_examples=2), seed=0)
    table = {
        2: [0.5, 1.0, 0.0, 1.0, 0.5, 0.5],  # keep 3: c1, c3, then c0 of the tied 0.5s (lowest index)
        4: [0.75, 0.25, 0.0, 0.5, 0.0, 0.0],  # of c0, c1, c3 keep 2: c0, c3
        24: [0.4, 0.0, 0.0, 0.6, 0.0, 0.0],  # the last round keeps one: c3
    }
    evaluator = TableEvaluator(task, optimizer, table)
    ctx = OptimizerContext(evaluator, None, "Answer.")  # type: ignore[arg-type]
    assert optimizer.total_steps == 3
    reports = [await optimizer.step(ctx) for _ in range(4)]
    assert optimizer.done and len(optimizer.candidates) == 6
    assert [sorted(indices) for indices, _ in evaluator.rounds] == [[0, 1, 2, 3, 4, 5], [0, 1, 3], [0, 3]]
    assert [len(examples) for _, examples in evaluator.rounds] == [2, 4, 24]
    first, second, last = (examples for _, examples in evaluator.rounds)
    assert second[:2] == first and last[:4] == second  # nested: a survivor's earlier answers are cache hits
    kept = [[c.details["candidate"] for c in r.candidates if c.details["kept"]] for r in reports[1:]]
    assert [sorted(k) for k in kept] == [[0, 1, 3], [0, 3], [3]]
    assert [r.candidates[r.leader].details["candidate"] for r in reports[1:]] == [1, 0, 3]  # each round's best
    winner = reports[-1].candidates[reports[-1].leader]
    assert winner.details["strategy"] == "random" and winner.score == 0.6
    assert winner.prompt == compose(
        "Answer.",
        [render_demonstration(task, task.split_examples("train")[i]) for i in winner.details["demonstrations"]],
    )
    # Later rounds always reach the dev selection.
    assert Fewshot.train_objective(winner) > Fewshot.train_objective(reports[1].candidates[reports[1].leader])
    state = optimizer.state_dict()
    restored = Fewshot(optimizer.params, 0)
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_params_presets_and_expected_calls():
    assert METHODS["fewshot"] is Fewshot
    params = FewshotParams()
    assert Fewshot.max_candidates(params) == 10 and Fewshot(params, 0).total_steps == 4
    # 112 initial + 10x8 + 5x8 + 3x16 + 2x80 for the rounds + 5 dev selections of 56
    assert Fewshot.expected_calls(params, 112, 56) == 112 + 328 + 5 * 56
    for name, preset in Fewshot.presets.items():
        assert FewshotParams(**preset), name
    with pytest.raises(ValidationError, match="nothing to search"):
        FewshotParams(random_sets=0, knn=[], zero_shot=False)
    with pytest.raises(ValidationError):
        DemonstrationsParams(strategy="fixed")
    with pytest.raises(ValidationError):
        DemonstrationsParams(positions=[1])


# ---------------------------------------------------------------------------------------------------------
# The engine: no leakage, the test reserve


def make_plan(method=Fewshot, params=None, task: Task | None = None, **caps) -> JobPlan:
    return JobPlan(
        method=method,
        params=params if params is not None else FewshotParams(random_sets=3, knn=[2], first_examples=4),
        seed=0,
        task=task or make_task(),
        initial_prompt="Answer.",
        scorer_backend="demo",
        optimizer_backend="demo",
        **caps,
    )


def engine_for(plan: JobPlan, scorer: DemoScorer, sink: ListSink | None = None, checkpoint=None) -> JobEngine:
    return JobEngine(
        plan, sink or ListSink(), scorer=scorer, optimizer_llm=scorer, usage=Usage(), checkpoint=checkpoint
    )


async def test_only_train_examples_are_shown_and_never_the_example_scored(fake_embeddings):
    task = make_task()
    scorer = DemoScorer()
    outcome = await engine_for(make_plan(task=task), scorer).run()
    assert outcome.stop_reason == StopReason.COMPLETED
    train = {items(ex.input)[0] for ex in task.split_examples("train")}
    held_out = {items(ex.input)[0] for ex in task.split_examples("dev") + task.split_examples("test")}
    queried = set()
    for prompt in scorer.prompts:
        *shown, query = items(prompt)
        queried.add(query)
        assert set(shown) <= train and query not in shown
    assert held_out <= queried  # dev and test were scored, only ever as queries
    assert any(len(items(p)) > 1 for p in scorer.prompts)


async def test_nearest_neighbour_best_is_rebuilt_for_dev_and_test(fake_embeddings):
    task = make_task()
    plan = make_plan(params=FewshotParams(random_sets=0, zero_shot=False, knn=[2]), task=task)
    sink = ListSink()
    outcome = await engine_for(plan, DemoScorer(demos_help=True), sink).run()
    best = outcome.selection.best
    assert best.step == 1 and best.artifact["kind"] == "nearest_demonstrations" and best.artifact["k"] == 2
    assert best.dev_score == 1.0 and best.test_score == 1.0 and outcome.selection.initial.test_score == 0.0
    rebuilt = Fewshot.prompt_from_artifact(best.artifact)
    (dev,) = await Evaluator(task, DemoScorer(demos_help=True)).score([rebuilt], "dev")
    assert dev.score == best.dev_score and dev.prompt == best.prompt


async def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(fake_embeddings):
    whole = await engine_for(make_plan(), DemoScorer()).run()
    crashed = ListSink(fail_after_steps=2)
    with pytest.raises(ConnectionError):
        await engine_for(make_plan(), DemoScorer(), crashed).run()
    resumed = await engine_for(make_plan(), DemoScorer(), checkpoint=crashed.steps[-1].checkpoint).run()
    assert resumed.selection.to_state() == whole.selection.to_state()


def test_the_test_reserve_counts_demonstrations():
    task = make_task()
    scorer = DemoScorer()
    n_test = len(task.split_examples("test"))
    plain = make_plan(Evaluate, EvaluateParams(), task).final_reserve(scorer)
    carried = make_plan(Evaluate, EvaluateParams(demonstrations=DemonstrationsParams(k_per_class=2)), task)
    block = compose("", [render_demonstration(task, task.split_examples("train")[i]) for i in range(4)])
    assert carried.final_reserve(scorer)[1] - plain[1] == n_test * 2 * scorer.count_tokens_upper_bound(block)
    fewshot = make_plan(Fewshot, FewshotParams(k_per_class=3), task).final_reserve(scorer)
    assert fewshot[1] - plain[1] == n_test * scorer.count_tokens_upper_bound(demos.longest_block(task, 6))


async def test_a_token_budget_still_scores_test_with_demonstrations():
    """A token cap of exactly what the search spends plus the test reserve: the test scoring of the initial prompt
    and of a best prompt carrying six long demonstrations costs more than the reserve kept without them, and fits
    in the one kept now."""
    examples = [Example(f"item {i} " + "w " * 60, LABELS[i % 2]) for i in range(48)]
    task = Task(examples, TEMPLATE, "label_accuracy", labels=list(LABELS), split=SplitSpec(), max_new_tokens=1)
    params = FewshotParams(random_sets=2, knn=[], zero_shot=False, k_per_class=3)  # one round of two
    free = ListSink()
    await engine_for(make_plan(params=params, task=task), DemoScorer(demos_help=True), free).run()
    search = free.steps[-1].usage.prompt_tokens + free.steps[-1].usage.completion_tokens

    scorer = DemoScorer(demos_help=True)
    _, prompt_reserve, completion_reserve = make_plan(params=params, task=task).final_reserve(scorer)
    cap = search + prompt_reserve + completion_reserve
    plan = make_plan(params=params, task=task, max_tokens=cap, max_llm_calls=None)
    sink = ListSink()
    engine = engine_for(plan, scorer, sink)
    outcome = await engine.run()
    best = outcome.selection.best
    assert outcome.stop_reason == StopReason.COMPLETED and len(sink.tests) == 1
    assert best.step == 1 and best.test_score == 1.0 and outcome.selection.initial.test_score == 0.0
    assert engine.usage.prompt_tokens + engine.usage.completion_tokens <= cap
    test_tokens = engine.usage.prompt_tokens - sink.steps[-1].usage.prompt_tokens
    without_demonstrations = make_plan(Evaluate, EvaluateParams(), task).final_reserve(scorer)[1]
    assert without_demonstrations < test_tokens <= prompt_reserve


# ---------------------------------------------------------------------------------------------------------
# OPRO carrying a fixed set


async def test_opro_edits_the_instruction_while_every_scored_prompt_carries_the_set():
    task = make_task()
    train = task.split_examples("train")
    scorer = DemoScorer()
    evaluator = Evaluator(task, scorer)
    ctx = OptimizerContext(evaluator, ScriptedOptimizerLLM(5), "Answer.")  # type: ignore[arg-type]
    spec = DemonstrationsParams(strategy="fixed", positions=[4, 1, 7])
    opro = Opro(OproParams(steps=2, candidates_per_step=2, exemplars_per_step=1, demonstrations=spec), 5)
    reports = [await opro.step(ctx) for _ in range(3)]
    shown = [items(train[i].input)[0] for i in (4, 1, 7)]
    for prompt in scorer.prompts:
        *carried, query = items(prompt)
        assert carried == [n for n in shown if n != query]  # the set, in order, less the example itself
    block = compose("", [render_demonstration(task, train[i]) for i in (4, 1, 7)])
    candidates = [c for r in reports for c in r.candidates]
    assert len(candidates) == 5
    for candidate in candidates:
        assert candidate.details["demonstrations"] == [4, 1, 7]
        assert candidate.prompt == block + "\n\n" + candidate.details["instruction"]
    assert candidates[0].details["instruction"] == "Answer." and candidates[0].details["origin"] == "initial"
    # The method itself saw instructions only: its history, and the meta-prompt's exemplars without the block.
    assert [h["instruction"] for h in opro.history] == [c.details["instruction"] for c in candidates]
    meta = ctx.optimizer_llm.calls[-1][0].prompt
    assert "Proposal s1 i0" in meta and block not in meta


def plum_llm():
    """Plum's paraphraser: the OPRO test double, one reply for any seed."""
    llm = ScriptedOptimizerLLM(5, default=lambda step, index: f"Decide yes or no, variant {step}-{index}.")
    llm.by_seed = AnySeed()
    return llm


class AnySeed(dict):
    def __getitem__(self, key):
        return (0, 0)


CARRIERS = {
    "apo": lambda spec: (
        Apo(ApoParams(**{**APO_SMALL, "rounds": 2, "minibatch_size": 6, "demonstrations": spec}), 5),
        ApoScriptedLLM(),
    ),
    "plum": lambda spec: (
        Plum(PlumParams(num_iterations=2, num_candidates=2, demonstrations=spec), 5),
        plum_llm(),
    ),
}


@pytest.mark.parametrize("method", sorted(CARRIERS))
async def test_apo_and_plum_edit_the_instruction_while_every_scored_prompt_carries_the_set(method):
    task = make_task()
    train = task.split_examples("train")
    scorer = DemoScorer()
    spec = DemonstrationsParams(strategy="fixed", positions=[6, 2, 9])
    optimizer, llm = CARRIERS[method](spec)
    ctx = OptimizerContext(Evaluator(task, scorer), llm, "Answer.")  # type: ignore[arg-type]
    reports = [await optimizer.step(ctx) for _ in range(optimizer.total_steps + 1)]
    shown = [items(train[i].input)[0] for i in (6, 2, 9)]
    assert scorer.prompts
    for prompt in scorer.prompts:
        *carried, query = items(prompt)
        assert carried == [n for n in shown if n != query]  # the set, in order, less the example itself
    block = compose("", [render_demonstration(task, train[i]) for i in (6, 2, 9)])
    candidates = [c for r in reports for c in r.candidates]
    assert len({c.details["instruction"] for c in candidates}) > 1  # the method did edit the instruction
    for candidate in candidates:
        assert candidate.details["demonstrations"] == [6, 2, 9]
        assert candidate.prompt == block + "\n\n" + candidate.details["instruction"]
        assert block not in candidate.details["instruction"]
    assert candidates[0].details["instruction"] == "Answer."
    # The method's own memory and its optimizer LLM saw instructions only.
    assert block not in json.dumps(optimizer.state_dict())
    meta = [request.prompt for call in llm.calls for request in call]
    assert meta and not any(render_demonstration(task, train[i]) in m for m in meta for i in (6, 2, 9))


async def test_a_searched_set_is_the_best_draw_on_the_scoring_set_and_is_kept_through_a_resume():
    """`strategy: search`: distinct seeded draws scored with the initial instruction in one batch; the best one (by
    an independent scoring) is carried by every later prompt, reported on the initial candidate and kept in the
    state, so a resumed run neither searches again nor changes set."""
    task = make_task()
    spec = DemonstrationsParams(strategy="search", sets=5, k_per_class=2)
    params = OproParams(steps=2, candidates_per_step=2, exemplars_per_step=1, demonstrations=spec)

    async def run(seed: int):
        scorer = DemoScorer()
        ctx = OptimizerContext(Evaluator(task, scorer), ScriptedOptimizerLLM(seed), "Answer.")  # type: ignore[arg-type]
        opro = Opro(params, seed)
        first = await opro.step(ctx)
        return opro, ctx, scorer, first

    opro, ctx, scorer, first = await run(5)
    sets = first.candidates[0].details["demonstration_search"]
    assert len(sets) == 5 and len({tuple(s["demonstrations"]) for s in sets}) == 5
    train = task.split_examples("train")
    for entry in sets:  # each set: k_per_class of each label
        assert sorted(train[i].target for i in entry["demonstrations"]) == ["no", "no", "yes", "yes"]
    # An independent scoring of every draw picks the same set.
    fresh = Evaluator(task, DemoScorer())
    draws = [FixedDemonstrations("Answer.", demonstrations_of(task, e["demonstrations"])) for e in sets]
    scores = [x.score for x in await fresh.score(draws, "train")]
    assert [e["score"] for e in sets] == scores
    chosen = sets[max(range(5), key=lambda i: (scores[i], -i))]["demonstrations"]
    assert first.candidates[0].details["demonstrations"] == chosen
    assert first.candidates[0].score == max(scores)
    # Deterministic per seed; another seed draws other sets.
    again = (await run(5))[3].candidates[0].details["demonstration_search"]
    other = (await run(6))[3].candidates[0].details["demonstration_search"]
    assert again == sets and [e["demonstrations"] for e in other] != [e["demonstrations"] for e in sets]

    # Resume after step 0: no new search, the same set on every later prompt.
    state = json.loads(json.dumps(opro.state_dict()))
    resumed = Opro(params, 5)
    resumed.load_state_dict(state)
    scorer.prompts.clear()
    reports = [await resumed.step(ctx) for _ in range(2)]
    shown = [items(train[i].input)[0] for i in chosen]
    assert scorer.prompts
    for prompt in scorer.prompts:
        *carried, query = items(prompt)
        assert carried == [n for n in shown if n != query]
    for candidate in (c for r in reports for c in r.candidates):
        assert candidate.details["demonstrations"] == chosen and "demonstration_search" not in candidate.details

    # Its cost is counted before the run, and its reserve covers any set it could choose.
    n_train = len(train)
    plain = OproParams(steps=2, candidates_per_step=2, exemplars_per_step=1)
    assert Opro.expected_calls(params, n_train, 12) == Opro.expected_calls(plain, n_train, 12) + 5 * n_train
    assert Opro.initial_calls(params, n_train, 12) == Opro.initial_calls(plain, n_train, 12) + 5 * n_train
    block = Opro.prompt_extras(params, task, 5)[0]
    assert len(block) >= len(compose("", [render_demonstration(task, train[i]) for i in chosen]))
    with pytest.raises(ValidationError, match="positions go with strategy 'fixed'"):
        DemonstrationsParams(strategy="search", positions=[1])


# ---------------------------------------------------------------------------------------------------------
# Through the API, on the fake server


async def test_a_fewshot_job_predicts_its_dev_score_and_lists_its_demonstrations(app_client, worker):
    body = label_job(
        method="fewshot",
        task={"dataset": "builtin:snli16", "demo_max_chars": 60},
        budget={"max_llm_calls": 1000},
    )
    body["params"] = {"random_sets": 3, "knn": [], "zero_shot": False, "first_examples": 4, "train_subset": 12}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["stop_reason"] == "completed", job
    assert job["progress"]["total_steps"] == 2  # 3 candidates: rounds of 3 and 2

    task = task_from_spec(job["spec"]["task"], BUILTIN_TASKS["snli16"].examples())
    train = task.split_examples("train")
    listed = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step&limit=100")).json()["items"]
    assert [c["step"] for c in listed] == [0, 1, 1, 1, 2, 2]
    for candidate in listed[1:]:
        positions = candidate["details"]["demonstrations"]
        assert len(positions) == 3 and sorted(train[i].target for i in positions) == sorted(task.labels)
        shown = [render_demonstration(task, train[i]) for i in positions]
        assert all(len(train[i].input) > 60 for i in positions) and all(len(s) < 60 + 80 for s in shown)
        assert candidate["prompt"] == compose(candidate["details"]["instruction"], shown)

    for use in ("best", "initial"):
        chosen = job[use]
        dev = task.split_examples("dev")
        answer = await app_client.post(
            f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in dev], "use": use}
        )
        assert answer.status_code == 200, answer.text
        outputs = [p["output"] for p in answer.json()["predictions"]]
        accuracy = sum(o == ex.target for o, ex in zip(outputs, dev, strict=True)) / len(dev)
        assert accuracy == pytest.approx(chosen["dev_score"])
    assert job["best"]["prompt"] != job["initial"]["prompt"] or job["best"]["step"] == 0


async def test_demonstrations_are_validated_and_listed(app_client):
    bad = label_job(params={"steps": 1, "demonstrations": {"strategy": "fixed", "positions": [0, 999]}})
    response = await app_client.post("/v1/jobs", json=bad)
    assert response.status_code == 422, response.text
    assert "outside the train split" in response.text and "params" in response.text
    bad = label_job(task={"dataset": "builtin:snli16", "demo_template": "Q: {input}"})
    response = await app_client.post("/v1/jobs", json=bad)
    assert response.status_code == 422 and "{target}" in response.text
    # The estimate's tokens per call count the demonstrations (no earlier job of its kind to learn from).
    body = {"method": "evaluate", "task": {"dataset": "builtin:bbh_boolean_expressions"}}
    plain = (await app_client.post("/v1/jobs/estimate", json=body)).json()
    body["params"] = {"demonstrations": {"k_per_class": 2}}
    carried = (await app_client.post("/v1/jobs/estimate", json=body)).json()
    assert "no earlier job" in plain["tokens_basis"] and "no earlier job" in carried["tokens_basis"]
    assert carried["expected_tokens"] > plain["expected_tokens"]
    methods = {m["name"]: m for m in (await app_client.get("/v1/methods")).json()}
    assert set(methods["fewshot"]["expected_calls"]) == {"default", *Fewshot.presets}
    assert methods["fewshot"]["description"] and methods["fewshot"]["optimizer_needs"] == []
    assert "demonstrations" in methods["opro"]["parameters"]["properties"]


async def test_predict_applies_a_nearest_neighbour_prompt_from_its_artifact(fake_embeddings):
    from app.jobs.service import PredictionPrompt, predict

    task = make_task()
    prompt = NearestDemonstrations.from_task(task, list(range(len(task.split_examples("train")))), "Answer.", 2)
    artifact = prompt.to_artifact("fewshot")

    class Registry:
        names = ["demo"]

        def capabilities(self, name: str) -> frozenset[Capability]:
            return frozenset({Capability.LABEL_LOGPROBS})

        async def get(self, name: str) -> DemoScorer:
            return scorer

    scorer = DemoScorer(demos_help=True)
    spec_task = Task([], task.template, task.metric, labels=list(LABELS))
    prediction = PredictionPrompt(Fewshot.prompt_from_artifact(artifact), spec_task, artifact)
    dev = task.split_examples("dev")
    outputs = await predict(Registry(), prediction, "demo", [ex.input for ex in dev])  # type: ignore[arg-type]
    assert outputs == [ex.target for ex in dev]
    assert all(len(items(p)) == 3 for p in scorer.prompts)


def _carried_positions(candidates: Sequence[dict[str, Any]]) -> set[tuple[int, ...]]:
    return {tuple(c["details"]["demonstrations"]) for c in candidates}


async def test_an_opro_job_carries_a_random_set_through_the_api(app_client, worker):
    body = label_job(params={"steps": 1, "candidates_per_step": 2, "demonstrations": {"k_per_class": 1, "seed": 3}})
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    listed = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step")).json()["items"]
    (positions,) = _carried_positions(listed)
    task = task_from_spec(job["spec"]["task"], BUILTIN_TASKS["snli16"].examples())
    train = task.split_examples("train")
    assert sorted(train[i].target for i in positions) == sorted(task.labels)
    block = compose("", [render_demonstration(task, train[i]) for i in positions])
    assert all(c["prompt"].startswith(block) for c in listed)
    assert job["initial"]["prompt"].startswith(block) and job["best"]["test_score"] is not None


async def test_an_apo_job_searches_its_set_through_the_api(app_client, worker):
    def apo_job(**params) -> dict:
        body = label_job(method="apo")
        body["params"] = {"preset": "small", "rounds": 1, **params}
        return body

    body = apo_job(demonstrations={"strategy": "search", "sets": 3, "k_per_class": 1})
    estimate = (await app_client.post("/v1/jobs/estimate", json=body)).json()
    plain = (await app_client.post("/v1/jobs/estimate", json=apo_job())).json()
    assert estimate["expected_llm_calls"] == plain["expected_llm_calls"] + 3 * estimate["split"]["train"]
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    listed = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step")).json()["items"]
    (positions,) = _carried_positions(listed)
    (initial,) = [c for c in listed if "demonstration_search" in c["details"]]
    searched = initial["details"]["demonstration_search"]
    assert len(searched) == 3 and list(positions) == max(searched, key=lambda s: s["score"])["demonstrations"]
    bad = apo_job(demonstrations={"strategy": "search", "sets": 1})
    response = await app_client.post("/v1/jobs", json=bad)
    assert response.status_code == 422 and "params.demonstrations.sets" in response.text
