"""APO / ProTeGi: the bandits against synthetic arms, parsing, expansion against a scripted optimizer LLM and a
real Evaluator over a scripted label scorer, resumable state, params, and one job through the HTTP API."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np
import pytest
from pydantic import ValidationError

from app.evaluation.evaluator import Evaluator
from app.evaluation.task import Example, Task
from app.llm.port import (
    BackendInfo,
    Capability,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
)
from app.optimizers import bandits
from app.optimizers.apo import Apo, ApoParams, instruction_hash, parse_tagged
from app.optimizers.base import OptimizerContext
from app.optimizers.registry import METHODS, get_method
from tests.conftest import label_job, wait_for_status

TEMPLATE = "{prompt}\nReview: {input}\nSentiment:"
LABELS = ["positive", "negative"]
MAGIC = "magic"
INITIAL = "Classify the review."


# ---------------------------------------------------------------------------------------------------------
# Bandits against synthetic Bernoulli arms

MEANS = [0.2, 0.35, 0.5, 0.55, 0.8, 0.4, 0.3, 0.45]
BEST = 4


def bernoulli_pull(seed: int, means: list[float], calls: list[tuple[list[int], int]]):
    rng = np.random.default_rng(seed)

    async def pull(arms: list[int], k: int) -> list[list[float]]:
        calls.append((list(arms), k))
        return [[float(x) for x in (rng.random(k) < means[a])] for a in arms]

    return pull


async def run_strategy(strategy: str, seed: int, keep: int = 1, calls=None) -> bandits.BanditResult:
    calls = [] if calls is None else calls
    return await bandits.select(
        strategy,
        len(MEANS),
        keep,
        bernoulli_pull(seed, MEANS, calls),
        np.random.default_rng(1000 + seed),
        budget=800,
        pool_size=10_000,
        eval_rounds=10,
        arms_per_round=3,
        samples_per_eval=25,
        c=1.0,
        a=1.0,
        min_samples=4,
    )


@pytest.mark.parametrize("strategy", bandits.STRATEGIES)
async def test_bandit_finds_best_arm_within_budget(strategy):
    hits = 0
    for seed in range(12):
        calls: list[tuple[list[int], int]] = []
        result = await run_strategy(strategy, seed, calls=calls)
        hits += result.top == [BEST]
        # One callback call per bandit round, and the bookkeeping matches what was pulled.
        assert result.batches == len(calls)
        assert result.spent == sum(len(arms) * k for arms, k in calls)
        budget = 10 * 3 * 25 if strategy.startswith("ucb") else 800
        assert result.spent <= budget
        for arms, _ in calls:
            assert len(set(arms)) == len(arms)
    assert hits >= 10, f"{strategy} found the best arm in only {hits}/12 runs"


@pytest.mark.parametrize("strategy", bandits.STRATEGIES)
async def test_bandit_keep_returns_distinct_best_first(strategy):
    result = await run_strategy(strategy, 3, keep=3)
    assert len(result.top) == 3 == len(set(result.top))
    assert BEST in result.top
    assert [result.means[a] for a in result.top] == sorted((result.means[a] for a in result.top), reverse=True)


async def test_ucb_explores_before_exploiting():
    """Unpulled arms come first, and round 2 already carries an exploration bonus (ln 2 > 0)."""
    calls: list[tuple[list[int], int]] = []
    result = await bandits.ucb(
        3,
        1,
        bernoulli_pull(0, [0.9, 0.1, 0.1], calls),
        np.random.default_rng(0),
        rounds=3,
        arms_per_round=1,
        samples_per_eval=5,
    )
    assert sorted(arms[0] for arms, _ in calls) == [0, 1, 2]
    assert result.counts == [5, 5, 5]


async def test_bf_and_small_arm_counts():
    calls: list[tuple[list[int], int]] = []
    result = await bandits.select(
        "sr",
        2,
        4,
        bernoulli_pull(0, [0.5, 0.6], calls),
        np.random.default_rng(0),
        budget=100,
        pool_size=30,
        eval_rounds=2,
        arms_per_round=2,
        samples_per_eval=5,
    )
    # Fewer arms than the beam: brute force on min(pool, budget / arms) examples, in one batch.
    assert calls == [([0, 1], 30)]
    assert sorted(result.top) == [0, 1]


def test_sr_schedule_respects_budget():
    k, keep, budget = 36, 4, 2048
    schedule = bandits.sr_schedule(k, keep, budget)
    assert len(schedule) == k - keep
    alive = k
    total = 0
    for new in schedule:
        total += new * alive
        alive -= 1
    assert total <= budget
    assert schedule[0] >= 4 and total >= budget * 0.8


# ---------------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("text", "fallback", "expected"),
    [
        ("<START>one<END> junk <START> two <END>", "paragraph", ["one", "two"]),
        ('<start>"Quoted"<end>', "paragraph", ["Quoted"]),
        ("<START>Open ended prompt\n\nmore text", "paragraph", ["Open ended prompt"]),
        ("Before the end<END> after", "paragraph", ["Before the end"]),
        ("First paragraph\nsecond line\n\nSecond paragraph", "paragraph", ["First paragraph\nsecond line"]),
        ("Output: New prompt here", "paragraph", ["New prompt here"]),
        ("A reason.\n\nMore of the reason.", "whole", ["A reason.\n\nMore of the reason."]),
        ("", "paragraph", []),
        ("<START>  <END>", "paragraph", []),
    ],
)
def test_parse_tagged(text, fallback, expected):
    assert parse_tagged(text, fallback) == expected


# ---------------------------------------------------------------------------------------------------------
# Scripted models


class ScriptedScorer:
    """Label scorer: with the magic word in the prompt it picks the gold label, otherwise always 'negative'."""

    def __init__(self, gold: dict[str, str]) -> None:
        self.gold = gold
        self.label_calls: list[list[LabelScoreRequest]] = []

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            "scorer", "scripted", "scripted-scorer", frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS})
        )

    async def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        raise AssertionError("the scorer should be asked for label log-probs")

    async def label_logprobs(self, requests: list[LabelScoreRequest]) -> list[LabelScores]:
        self.label_calls.append(list(requests))
        out = []
        for request in requests:
            item = re.search(r"Review: (.*)\n", request.prompt).group(1)
            chosen = self.gold[item] if MAGIC in request.prompt.lower() else "negative"
            out.append(LabelScores([0.0 if label == chosen else -5.0 for label in LABELS], prompt_tokens=10))
        return out


def current_instruction(prompt: str) -> str:
    match = re.search(r'My current instruction is:\n"(.*?)"\n', prompt, re.DOTALL)
    if match:
        return match.group(1)
    return re.search(r"Input: (.*?)\n\nOutput:", prompt, re.DOTALL).group(1)


def kind_of(prompt: str) -> str:
    if prompt.startswith("Generate a variation"):
        return "paraphrase"
    if "new instruction" in prompt:
        return "edit"
    return "gradient"


def default_reply(kind: str, prompt: str, seed: int) -> str:
    instruction = current_instruction(prompt)
    tag = seed % 100_000
    if kind == "gradient":
        return f"<START>It never mentions the {MAGIC} word ({tag}).<END>"
    if kind == "edit":
        return f"<START>{instruction} Use {MAGIC} {tag}.<END>"
    return f"{instruction} (rephrased {tag})"


class ScriptedOptimizerLLM:
    """Replies depend only on the request (prompt kind, prompt, seed), never on call order."""

    def __init__(self, reply: Callable[[str, str, int], str] = default_reply) -> None:
        self.reply = reply
        self.calls: list[list[GenerationRequest]] = []

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("optimizer", "scripted", "scripted-optimizer", frozenset({Capability.GENERATE}))

    def requests(self, kind: str) -> list[GenerationRequest]:
        return [r for call in self.calls for r in call if kind_of(r.prompt) == kind]

    async def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        self.calls.append(list(requests))
        return [
            Generation([self.reply(kind_of(r.prompt), r.prompt, r.seed)], prompt_tokens=50, completion_tokens=10)
            for r in requests
        ]

    async def label_logprobs(self, requests: list[LabelScoreRequest]) -> list[LabelScores]:
        raise AssertionError("APO's optimizer only generates")


class CountingEvaluator(Evaluator):
    def __init__(self, task: Task, llm: ScriptedScorer) -> None:
        super().__init__(task, llm)
        self.score_calls: list[tuple[list[str], int]] = []

    async def score(self, prompts, split="train", examples=None):
        self.score_calls.append((list(prompts), len(examples) if examples is not None else -1))
        return await super().score(prompts, split, examples)


def make_ctx(reply=default_reply, n: int = 24, initial: str = INITIAL):
    examples = [Example(f"item {i}", LABELS[i % 3 == 0]) for i in range(n)]  # a third negative
    task = Task(examples=examples, template=TEMPLATE, metric="label_accuracy", labels=list(LABELS))
    evaluator = CountingEvaluator(task, ScriptedScorer({ex.input: ex.target for ex in task.examples}))
    llm = ScriptedOptimizerLLM(reply)
    return OptimizerContext(evaluator=evaluator, optimizer_llm=llm, initial_prompt=initial), llm


SMALL = {
    "rounds": 2,
    "beam_size": 2,
    "minibatch_size": 8,
    "n_gradients": 2,
    "errors_per_gradient": 2,
    "steps_per_gradient": 1,
    "mc_samples_per_step": 1,
    "max_expansion_factor": 8,
    "samples_per_eval": 4,
    "eval_rounds": 3,
    "eval_prompts_per_round": 3,
}


def make_apo(seed: int = 5, **params) -> Apo:
    return Apo(ApoParams(**{**SMALL, **params}), seed)


# ---------------------------------------------------------------------------------------------------------
# Expansion


async def test_expansion_counts():
    ctx, llm = make_ctx()
    apo = make_apo(
        n_gradients=3, gradients_per_error=1, steps_per_gradient=1, mc_samples_per_step=2, max_expansion_factor=20
    )
    result = await apo.expand(ctx, 1, [INITIAL])
    st = result.stats
    assert st["errors"] > 0
    assert len(llm.requests("gradient")) == 3 and st["gradients"] == 3
    assert len(llm.requests("edit")) == 3 and st["edits"] == 3
    # Paraphrases of every rewrite and of the parent: (3 + 1) x 2.
    assert len(llm.requests("paraphrase")) == 8 and st["paraphrases"] == 8
    # Four batched optimizer calls: the parent's paraphrases (concurrently with the rest), gradients, edits, the
    # edits' paraphrases; all seeded and sampled.
    assert sorted([kind_of(r.prompt) for r in call] for call in llm.calls) == sorted(
        [["paraphrase"] * 2, ["gradient"] * 3, ["edit"] * 3, ["paraphrase"] * 6]
    )
    assert all(r.seed is not None and r.temperature == 0.7 for call in llm.calls for r in call)
    assert len({r.seed for call in llm.calls for r in call}) == 14
    origins = [s.origin for s in result.successors]
    assert origins.count("edit") == 3 and origins.count("paraphrase") == 8
    assert all(MAGIC in s.instruction for s in result.successors if s.origin == "edit")
    # Each gradient request shows at most errors_per_gradient errors.
    for request in llm.requests("gradient"):
        assert request.prompt.count("## Example") == 2


async def test_expansion_deduplicates_against_seen_and_itself():
    def reply(kind, prompt, seed):
        if kind == "gradient":
            return "<START>reason<END>"
        if kind == "edit":
            return "<START>Same rewrite magic.<END>"
        return INITIAL if "rephrased" not in prompt else "x"

    ctx, _ = make_ctx(reply)
    apo = make_apo(n_gradients=3, mc_samples_per_step=1)
    result = await apo.expand(ctx, 1, [INITIAL])
    # Three identical rewrites -> one; paraphrases equal to the parent -> dropped.
    assert [s.instruction for s in result.successors] == ["Same rewrite magic."]
    assert result.stats["duplicates"] == 2 + 4
    # Already-seen instructions are never proposed again.
    apo.seen.add("Same rewrite magic.")
    again = await apo.expand(ctx, 1, [INITIAL])
    assert again.successors == []


async def test_expansion_cap_random():
    ctx, _ = make_ctx()
    apo = make_apo(n_gradients=4, steps_per_gradient=2, mc_samples_per_step=1, max_expansion_factor=3)
    result = await apo.expand(ctx, 1, [INITIAL, "Another instruction."])
    per_parent = [sum(s.parent == p for s in result.successors) for p in (0, 1)]
    assert per_parent == [3, 3]
    assert result.stats["capped"] > 0
    # Seeded by (job seed, round): the same choice again.
    again = await make_apo(n_gradients=4, steps_per_gradient=2, mc_samples_per_step=1, max_expansion_factor=3).expand(
        make_ctx()[0], 1, [INITIAL, "Another instruction."]
    )
    assert [s.instruction for s in again.successors] == [s.instruction for s in result.successors]


async def test_expansion_reject_on_errors_keeps_fixing_successors():
    def reply(kind, prompt, seed):
        if kind == "gradient":
            return "<START>reason<END>"
        if kind == "edit":
            return f"<START>Fixed {MAGIC} {seed}.<END>"
        return f"Plain paraphrase {seed}"  # never fixes anything

    # 2 edits (magic) + 3 x 1 + ... paraphrases; cap 3 -> pool of up to 6 scored on the parent's errors.
    params = {"n_gradients": 2, "mc_samples_per_step": 1, "max_expansion_factor": 2}
    ctx, _ = make_ctx(reply)
    result = await make_apo(expansion="reject_on_errors", **params).expand(ctx, 1, [INITIAL])
    kept = [s.instruction for s in result.successors]
    assert len(kept) == 2 and all(MAGIC in k for k in kept)
    # The error check is one extra evaluator call, on the parent's errors only.
    prompts, n_examples = ctx.evaluator.score_calls[-1]
    assert len(prompts) == 4 and 0 < n_examples <= 8


# ---------------------------------------------------------------------------------------------------------
# Rounds, selection, state


@pytest.mark.parametrize("selection", bandits.STRATEGIES)
async def test_rounds_improve_and_batch_each_bandit_round(selection):
    ctx, _ = make_ctx()
    apo = make_apo(selection=selection, rounds=2)
    first = await apo.step(ctx)
    assert first.step == 0 and [c.prompt for c in first.candidates] == [INITIAL]
    initial_score = first.candidates[0].score
    train = ctx.evaluator.task.split_examples("train")
    # Without the magic word the scorer always says "negative"; the budget covers the whole train split.
    assert initial_score == pytest.approx(sum(ex.target == "negative" for ex in train) / len(train))
    calls_before = len(ctx.evaluator.score_calls)
    report = await apo.step(ctx)
    assert report.step == 1 and report.candidates
    assert len(apo.beam) == 2
    assert apo.beam[0]["score"] > initial_score and MAGIC in apo.beam[0]["instruction"].lower()
    assert all(c.details["n"] > 0 for c in report.candidates)
    assert sum(c.details["in_beam"] for c in report.candidates) == 2
    # Expansion makes one scoring call (the minibatch); every other call is one bandit round.
    selection_calls = len(ctx.evaluator.score_calls) - calls_before - 1
    assert selection_calls >= 1
    await apo.step(ctx)
    assert apo.done
    with pytest.raises(RuntimeError):
        await apo.step(ctx)


def _summary(report):
    return [(c.prompt, c.score, c.details) for c in report.candidates], report.message


@pytest.mark.parametrize("selection", ["bf", "ucb", "sr"])
async def test_state_round_trip_replays_identically(selection):
    ctx_a, _ = make_ctx()
    uninterrupted = make_apo(selection=selection, rounds=3)
    reports_a = [await uninterrupted.step(ctx_a) for _ in range(4)]

    ctx_b, _ = make_ctx()
    first = make_apo(selection=selection, rounds=3)
    for _ in range(2):
        await first.step(ctx_b)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = make_apo(selection=selection, rounds=3)
    resumed.load_state_dict(state)
    ctx_c, _ = make_ctx()
    reports_b = [await resumed.step(ctx_c) for _ in range(2)]
    assert [_summary(r) for r in reports_b] == [_summary(r) for r in reports_a[2:]]
    assert json.dumps(resumed.state_dict()) == json.dumps(uninterrupted.state_dict())
    assert set(state["method"]) == {"beam", "seen"}
    assert instruction_hash(INITIAL) in state["method"]["seen"]


# ---------------------------------------------------------------------------------------------------------
# Params, presets, registry


def test_params_presets_and_registry():
    assert METHODS["apo"] is Apo and get_method("apo") is Apo
    assert Apo.optimizer_needs == frozenset({Capability.GENERATE}) and Apo.scorer_needs == frozenset()
    defaults = ApoParams()
    assert (defaults.rounds, defaults.beam_size, defaults.minibatch_size) == (6, 4, 64)
    assert (defaults.n_gradients, defaults.errors_per_gradient, defaults.mc_samples_per_step) == (4, 4, 2)
    assert defaults.max_expansion_factor == 8 and defaults.selection == "bf" and defaults.budget == 2048
    for name in ("paper", "small"):
        params = ApoParams(**Apo.presets[name])
        assert Apo(params, 0).total_steps == params.rounds
    small = ApoParams(**Apo.presets["small"])
    assert small.rounds <= 2 and small.beam_size <= 2 and small.optimizer_max_tokens <= 128
    assert ApoParams(eval_budget=100).budget == 100
    for bad in ({"selection": "greedy"}, {"beam_size": 0}, {"rounds": -1}, {"expansion": "all"}, {"knob": 1}):
        with pytest.raises(ValidationError):
            ApoParams(**bad)


# ---------------------------------------------------------------------------------------------------------
# Through the HTTP API


async def test_apo_job_runs_to_success(app_client, worker, fake_llm):
    body = label_job(method="apo")
    body["params"] = {"preset": "small", "rounds": 1, "minibatch_size": 4, "max_expansion_factor": 3}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["method"] == "apo"
    progress = job["progress"]
    assert (progress["step"], progress["total_steps"], progress["fraction"], progress["phase"]) == (
        1,
        1,
        1.0,
        "finished",
    )
    for key in ("initial", "best"):
        assert job[key]["dev_score"] is not None and job[key]["test_score"] is not None
    assert job["best"]["dev_score"] >= job["initial"]["dev_score"]
    assert job["usage"]["llm_calls"] == fake_llm.count(("chat", "completions"))
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=score")).json()["items"]
    assert candidates and {c["step"] for c in candidates} <= {0, 1}
    # The round scored the beam and at least one successor the optimizer LLM proposed.
    assert any(c["step"] == 1 and c["prompt"] != job["initial"]["prompt"] for c in candidates)
