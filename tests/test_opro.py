"""OPRO against a scripted optimizer LLM and a real Evaluator over a scripted label scorer."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable

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
from app.optimizers.base import OptimizerContext
from app.optimizers.opro import (
    Opro,
    OproParams,
    build_meta_prompt,
    extract_instruction,
    instruction_hash,
    polish,
    rejection_reason,
    request_seed,
    trajectory,
)
from app.optimizers.registry import METHODS, get_method

TEMPLATE = "{prompt}\nReview: {input}\nSentiment:"
LABELS = ["positive", "negative"]
MAGIC = "magic"
INITIAL = "Classify the review."


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

    @property
    def scored_requests(self) -> int:
        return sum(len(c) for c in self.label_calls)


class ScriptedOptimizerLLM:
    """Looks like a MeteredLLM to the optimizer. Replies are keyed by (step, index), recovered from the
    request's seed, so they do not depend on call order (two identical instances answer identically)."""

    def __init__(
        self,
        job_seed: int,
        script: dict[tuple[int, int], str] | None = None,
        default: Callable[[int, int], str] | None = None,
    ) -> None:
        self.script = script or {}
        self.default = default or (lambda step, index: f"<INS>Proposal s{step} i{index}</INS>")
        self.by_seed = {request_seed(job_seed, s, i): (s, i) for s in range(40) for i in range(40)}
        self.calls: list[list[GenerationRequest]] = []

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("optimizer", "scripted", "scripted-optimizer", frozenset({Capability.GENERATE}))

    async def generate(self, requests: list[GenerationRequest], on_result=None) -> list[Generation]:
        self.calls.append(list(requests))
        out = []
        for request in requests:
            step, index = self.by_seed[request.seed]
            text = self.script.get((step, index), self.default(step, index))
            out.append(Generation(texts=[text], prompt_tokens=100, completion_tokens=10))
        return out

    async def label_logprobs(self, requests: list[LabelScoreRequest]) -> list[LabelScores]:
        raise AssertionError("OPRO's optimizer only generates")


class CountingEvaluator(Evaluator):
    def __init__(self, task: Task, llm: ScriptedScorer) -> None:
        super().__init__(task, llm)
        self.score_calls: list[list[str]] = []

    async def score(self, prompts, split="train", examples=None):
        self.score_calls.append(list(prompts))
        return await super().score(prompts, split, examples)


def make_task(n: int = 12) -> Task:
    examples = [Example(f"item {i}", LABELS[i % 3 == 0]) for i in range(n)]  # a third negative
    return Task(examples=examples, template=TEMPLATE, metric="label_accuracy", labels=list(LABELS))


def make_ctx(job_seed: int = 7, script=None, default=None, initial: str = INITIAL):
    task = make_task()
    scorer = ScriptedScorer({ex.input: ex.target for ex in task.examples})
    evaluator = CountingEvaluator(task, scorer)
    llm = ScriptedOptimizerLLM(job_seed, script, default)
    return OptimizerContext(evaluator=evaluator, optimizer_llm=llm, initial_prompt=initial), scorer, llm


def make_opro(seed: int = 7, **params) -> Opro:
    return Opro(OproParams(**{"steps": 3, "candidates_per_step": 4, **params}), seed)


async def run_steps(opro: Opro, ctx: OptimizerContext, n: int):
    return [await opro.step(ctx) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Sure, here it is: <INS>read the review carefully.</INS> Hope it helps", "Read the review carefully."),
        ("<ins>lower-case tags</ins>", "Lower-case tags"),
        ("<INS>\n  multi\nline  \n</INS>", "Multi\nline"),
        ("<INS>**Bold** answer.</INS>", "Bold answer."),
        ("Here: <INS> no closing tag here\nsecond line", "No closing tag here"),
        ("<INS>\n\n  next line instead\n", "Next line instead"),
        ("I suggest [decide whether the review is positive] for this.", "Decide whether the review is positive"),
        ('\n\n  - Instruction: "judge the sentiment."\nmore text', "Judge the sentiment."),
        ("* New instruction: 'be concise'", "Be concise"),
        ("1. Prompt: answer with one word", "Answer with one word"),
        ("“Smart quotes are stripped”", "Smart quotes are stripped"),
        ("Text-based prefixes without a colon stay", "Text-based prefixes without a colon stay"),
        ("", ""),
        ("   \n \n", ""),
    ],
)
def test_extract_instruction(text: str, expected: str) -> None:
    assert extract_instruction(text) == expected


def test_polish() -> None:
    assert polish("  **think** first  ") == "Think first"
    assert polish("") == ""


# ---------------------------------------------------------------------------------------------------------
# Filters and de-duplication


def test_rejection_reasons() -> None:
    params = OproParams(max_instruction_chars=20, forbid_digits=True)
    seen = {instruction_hash("Old one")}
    assert rejection_reason("", seen, params) == "empty"
    assert rejection_reason("Old one", seen, params) == "duplicate"
    assert rejection_reason("x" * 21, seen, params) == "too_long"
    assert rejection_reason("x" * 20, seen, params) is None
    assert rejection_reason("Use <INS> here", seen, params) == "contains_INS"
    assert rejection_reason("Follow INSTRUCTIONS", seen, params) == "contains_INS"
    assert rejection_reason("Think in 3 steps", seen, params) == "digit"
    assert rejection_reason("Think in 3 steps", seen, OproParams()) is None


async def test_duplicates_are_never_rescored() -> None:
    script = {
        (1, 0): f"<INS>{INITIAL}</INS>",  # the initial prompt again
        (1, 1): "<INS>be brief</INS>",
        (1, 2): "<INS>Be brief</INS>",  # same after polishing, same step
        (1, 3): "<INS>New one</INS>",
        (2, 0): "<INS>Be brief</INS>",  # seen at step 1
        (2, 1): "<INS>**New one**</INS>",  # seen at step 1
        (2, 2): "<INS>Fresh</INS>",
        (2, 3): "<INS>Fresh</INS>",
    }
    ctx, scorer, _ = make_ctx(script=script)
    opro = make_opro()
    reports = await run_steps(opro, ctx, 3)
    n_train = len(ctx.evaluator.task.split_examples("train"))

    # Each new proposal is scored on its own, as soon as it arrives.
    assert ctx.evaluator.score_calls == [[INITIAL], ["Be brief"], ["New one"], ["Fresh"]]
    assert scorer.scored_requests == 4 * n_train
    assert [[c.prompt for c in r.candidates] for r in reports] == [[INITIAL], ["Be brief", "New one"], ["Fresh"]]
    assert "2 duplicate" in reports[1].message
    assert "3 duplicate" in reports[2].message
    assert [h["instruction"] for h in opro.history] == [INITIAL, "Be brief", "New one", "Fresh"]


async def test_length_ins_and_digit_filters() -> None:
    script = {
        (1, 0): "<INS>" + "very long " * 10 + "</INS>",
        (1, 1): "<INS>Follow the INSTRUCTIONS</INS>",
        (1, 2): "<INS>Think in 3 steps</INS>",
        (1, 3): "<INS>Fine one</INS>",
    }
    ctx, _, _ = make_ctx(script=script)
    opro = make_opro(max_instruction_chars=40, forbid_digits=True)
    reports = await run_steps(opro, ctx, 2)
    assert [c.prompt for c in reports[1].candidates] == ["Fine one"]
    assert "1 too_long" in reports[1].message
    assert "1 contains_INS" in reports[1].message
    assert "1 digit" in reports[1].message

    ctx, _, _ = make_ctx(script=script)
    opro = make_opro(max_instruction_chars=40, forbid_digits=False)
    reports = await run_steps(opro, ctx, 2)
    assert [c.prompt for c in reports[1].candidates] == ["Think in 3 steps", "Fine one"]


async def test_one_extra_round_for_unparseable_replies() -> None:
    script = {(1, 0): "", (1, 1): "   ", (1, 4): "<INS>Extra</INS>", (1, 5): ""}
    ctx, _, llm = make_ctx(script=script)
    opro = make_opro()
    reports = await run_steps(opro, ctx, 2)
    assert [len(c) for c in llm.calls] == [4, 2]
    assert [r.seed for r in llm.calls[1]] == [request_seed(7, 1, 4), request_seed(7, 1, 5)]
    assert [c.prompt for c in reports[1].candidates] == ["Proposal s1 i2", "Proposal s1 i3", "Extra"]


# ---------------------------------------------------------------------------------------------------------
# Meta-prompt


def _history(scores: list[float]) -> list[dict]:
    return [{"instruction": f"Instruction {chr(65 + i)}", "score": s, "step": i} for i, s in enumerate(scores)]


def test_trajectory_order_limit_and_threshold() -> None:
    history = _history([0.1, 0.9, 0.5, 0.05, 0.7, 0.3])
    assert [h["score"] for h in trajectory(history, 3, 0.0)] == [0.5, 0.7, 0.9]
    assert [h["score"] for h in trajectory(history, 10, 0.2)] == [0.3, 0.5, 0.7, 0.9]
    assert [h["score"] for h in trajectory(history, 10, 0.0)] == [0.05, 0.1, 0.3, 0.5, 0.7, 0.9]


async def test_meta_prompt_history_block() -> None:
    ctx, _, llm = make_ctx()
    opro = make_opro(max_history=3, history_score_threshold=0.2, exemplars_per_step=0)
    await opro.step(ctx)
    opro.history = _history([0.1, 0.905, 0.5, 0.05, 0.756, 0.3])
    await opro.step(ctx)
    prompt = llm.calls[0][0].prompt

    pairs = re.findall(r"text:\n(.*)\nscore:\n(.*)", prompt)
    assert pairs == [("Instruction C", "50"), ("Instruction E", "76"), ("Instruction B", "90")]
    assert "0.756" not in prompt and "Instruction A" not in prompt and "Instruction D" not in prompt
    # best last, closest to the request; the request comes after everything
    assert prompt.index("Instruction B") > prompt.index("Instruction E") > prompt.index("Instruction C")
    assert prompt.rstrip().endswith("between <INS> and </INS>.")
    assert "Ground truth answer" not in prompt

    # the threshold keeps what the cap would otherwise show
    opro2 = make_opro(max_history=10, history_score_threshold=0.2)
    opro2.history = _history([0.1, 0.905, 0.5, 0.05, 0.756, 0.3])
    text, _ = opro2.meta_prompt(ctx, 1)
    assert [s for _, s in re.findall(r"text:\n(.*)\nscore:\n(.*)", text)] == ["30", "50", "76", "90"]


async def test_meta_prompt_requests() -> None:
    ctx, _, llm = make_ctx()
    opro = make_opro(optimizer_temperature=0.7, optimizer_max_tokens=99)
    await run_steps(opro, ctx, 2)
    (requests,) = llm.calls
    assert len({r.prompt for r in requests}) == 1
    assert all(r.temperature == 0.7 and r.max_tokens == 99 and r.n == 1 for r in requests)
    train = ctx.evaluator.task.split_examples("train")
    expected = round(100 * sum(ex.target == "negative" for ex in train) / len(train))
    assert f"text:\n{INITIAL}\nscore:\n{expected}\n" in requests[0].prompt


async def test_exemplars_template_position() -> None:
    ctx, _, llm = make_ctx()
    opro = make_opro(exemplars_per_step=3)
    await run_steps(opro, ctx, 2)
    prompt = llm.calls[0][0].prompt
    blocks = re.findall(r"input:\n<INS>\nReview: (item \d+)\nSentiment:\nGround truth answer:\n(\w+)", prompt)
    assert len(blocks) == 3 == prompt.count("Ground truth answer:")
    gold = {ex.input: ex.target for ex in ctx.evaluator.task.examples}
    assert all(gold[item] == answer for item, answer in blocks)
    train = {ex.input for ex in ctx.evaluator.task.split_examples("train")}
    assert {item for item, _ in blocks} <= train
    # exemplars come after the trajectory
    assert prompt.index("Ground truth answer:") > prompt.index(f"text:\n{INITIAL}")


@pytest.mark.parametrize(
    ("position", "frame"),
    [
        ("before_Q", "<INS>\nQ: item \\d+\n\nA:"),
        ("Q_begin", "Q: <INS>\nitem \\d+\n\nA:"),
        ("Q_end", "Q: item \\d+\n<INS>\n\nA:"),
        ("A_begin", "Q: item \\d+\n\nA: <INS>"),
    ],
)
async def test_exemplars_classic_positions(position: str, frame: str) -> None:
    ctx, scorer, llm = make_ctx()
    opro = make_opro(exemplars_per_step=2, instruction_position=position)
    await run_steps(opro, ctx, 2)
    prompt = llm.calls[0][0].prompt
    assert len(re.findall("input:\n" + frame + "\nGround truth answer:", prompt)) == 2
    # the evaluator still renders the task's own template
    assert scorer.label_calls[1][0].prompt.startswith("Proposal s1 i0\nReview: item")


async def test_exemplars_capped_by_scoring_set() -> None:
    ctx, _, llm = make_ctx()
    opro = make_opro(exemplars_per_step=50)
    await run_steps(opro, ctx, 2)
    assert llm.calls[0][0].prompt.count("Ground truth answer:") == len(ctx.evaluator.task.split_examples("train"))


def test_build_meta_prompt_without_history() -> None:
    text = build_meta_prompt([], [("<INS>\nReview: x\nSentiment:", "positive")])
    assert "text:" not in text and "scores higher" not in text
    assert "Ground truth answer:\npositive" in text


# ---------------------------------------------------------------------------------------------------------
# Exemplar selection


def test_exemplar_selection_random_and_constant() -> None:
    rand = make_opro(exemplar_selection="random", exemplars_per_step=3)
    picks = [rand.select_exemplars(s, 20) for s in range(1, 6)]
    assert picks == [
        make_opro(exemplar_selection="random", exemplars_per_step=3).select_exemplars(s, 20) for s in range(1, 6)
    ]
    assert len({tuple(p) for p in picks}) > 1
    assert all(len(set(p)) == 3 for p in picks)
    assert make_opro(seed=8, exemplar_selection="random").select_exemplars(1, 20) != picks[0]

    const = make_opro(exemplar_selection="constant", exemplars_per_step=3)
    assert len({tuple(const.select_exemplars(s, 20)) for s in range(1, 6)}) == 1


def test_exemplar_selection_most_frequent() -> None:
    acc = make_opro(exemplar_selection="accumulative_most_frequent", exemplars_per_step=3)
    acc.failures = [0, 5, 1, 7, 0, 2]
    assert acc.select_exemplars(1, 6) == [3, 1, 5]

    cur = make_opro(exemplar_selection="current_most_frequent", exemplars_per_step=2, max_history=2)
    cur.failures = [9, 9, 0, 0]  # ignored by this criterion
    cur.history = [
        {"instruction": "low", "score": 0.1, "step": 0, "failed": [0, 1]},  # not shown (max_history 2)
        {"instruction": "mid", "score": 0.5, "step": 1, "failed": [2, 3]},
        {"instruction": "top", "score": 0.7, "step": 1, "failed": [3]},
    ]
    assert cur.select_exemplars(1, 4) == [3, 2]


async def test_failure_counts_tracked() -> None:
    ctx, _, _ = make_ctx()
    opro = make_opro(exemplar_selection="current_most_frequent")
    await opro.step(ctx)
    train = ctx.evaluator.task.split_examples("train")
    expected = [int(ex.target != "negative") for ex in train]
    assert opro.failures == expected
    assert opro.history[0]["failed"] == [i for i, f in enumerate(expected) if f]


# ---------------------------------------------------------------------------------------------------------
# Seeds, subset, state


async def test_request_seeds_are_deterministic() -> None:
    ctx_a, _, llm_a = make_ctx()
    ctx_b, _, llm_b = make_ctx()
    await run_steps(make_opro(), ctx_a, 3)
    await run_steps(make_opro(), ctx_b, 3)
    seeds_a = [[r.seed for r in call] for call in llm_a.calls]
    seeds_b = [[r.seed for r in call] for call in llm_b.calls]
    assert seeds_a == seeds_b
    assert seeds_a == [[request_seed(7, step, i) for i in range(4)] for step in (1, 2)]
    flat = [s for call in seeds_a for s in call]
    assert len(set(flat)) == len(flat)
    assert all(0 <= s < 2**31 for s in flat)
    assert request_seed(8, 1, 0) != request_seed(7, 1, 0)
    assert all(r.deterministic for call in llm_a.calls for r in call)


async def test_train_subset() -> None:
    ctx, scorer, _ = make_ctx()
    opro = make_opro(train_subset=3)
    await run_steps(opro, ctx, 3)
    assert len(opro.scoring_positions) == 3
    n_train = len(ctx.evaluator.task.split_examples("train"))
    assert all(0 <= p < n_train for p in opro.scoring_positions)
    # the initial prompt, then 4 proposals a step, each scored on its own on the same 3 examples
    assert [len(call) for call in scorer.label_calls] == [3] * 9
    items = {re.search(r"Review: (.*)\n", r.prompt).group(1) for call in scorer.label_calls for r in call}
    assert len(items) == 3
    assert make_opro(train_subset=3).state_dict()["scoring_positions"] is None

    ctx_all, _, _ = make_ctx()
    whole = make_opro(score_on_subset=100)  # the former name still validates (stored job specs use it)
    assert whole.params.train_subset == 100
    await whole.step(ctx_all)
    assert whole.scoring_positions == list(range(n_train))


async def test_state_dict_round_trip() -> None:
    params = {"exemplar_selection": "current_most_frequent", "train_subset": 5}
    ctx, _, _ = make_ctx()
    original = make_opro(**params)
    await run_steps(original, ctx, 2)

    state = json.loads(json.dumps(original.state_dict()))
    assert state == original.state_dict()
    restored = make_opro(**params)
    restored.load_state_dict(state)
    assert json.dumps(restored.state_dict(), sort_keys=True) == json.dumps(original.state_dict(), sort_keys=True)

    ctx_a, _, llm_a = make_ctx()
    ctx_b, _, llm_b = make_ctx()
    report_a = await original.step(ctx_a)
    report_b = await restored.step(ctx_b)
    assert report_a == report_b
    assert [r.prompt for r in llm_a.calls[0]] == [r.prompt for r in llm_b.calls[0]]
    assert [r.seed for r in llm_a.calls[0]] == [r.seed for r in llm_b.calls[0]]
    assert original.state_dict() == restored.state_dict()
    assert original.steps_done == restored.steps_done == 3


async def test_end_to_end_finds_magic_prompt() -> None:
    script = {(2, 2): "Here is my suggestion:\n<INS>Use the magic word and read closely.</INS>"}
    ctx, _, llm = make_ctx(script=script)
    opro = make_opro(steps=3)
    assert opro.total_steps == 3
    reports = []
    while not opro.done:
        reports.append(await opro.step(ctx))
    assert [r.step for r in reports] == [0, 1, 2, 3]
    best = opro.best()
    assert best.prompt == "Use the magic word and read closely."
    assert best.score == 1.0 and best.step == 2
    # the winner shows last in the step-3 meta-prompt
    step3 = llm.calls[-1][0].prompt
    last = re.findall(r"text:\n(.*)\nscore:\n(.*)", step3)[-1]
    assert last == ("Use the magic word and read closely.", "100")
    magic = next(c for c in reports[2].candidates if c.prompt == best.prompt)
    assert "magic word" in magic.details["raw"]
    with pytest.raises(RuntimeError):
        await opro.step(ctx)


def test_best_ties_go_to_earliest() -> None:
    opro = make_opro()
    assert opro.best() is None
    opro.history = [
        {"instruction": "a", "score": 0.5, "step": 0},
        {"instruction": "b", "score": 0.8, "step": 1},
        {"instruction": "c", "score": 0.8, "step": 2},
    ]
    assert opro.best().prompt == "b"


# ---------------------------------------------------------------------------------------------------------
# Params, presets, registry


def test_params_defaults_and_bounds() -> None:
    p = OproParams()
    assert (p.steps, p.candidates_per_step, p.exemplars_per_step, p.max_history) == (200, 8, 3, 20)
    assert (p.optimizer_temperature, p.optimizer_max_tokens, p.max_instruction_chars) == (1.0, 512, 500)
    assert p.exemplar_selection == "random" and p.instruction_position == "template"
    assert p.history_score_threshold == 0.0 and p.forbid_digits is False and p.train_subset is None
    with pytest.raises(ValidationError):
        OproParams(unknown=1)
    with pytest.raises(ValidationError):
        OproParams(candidates_per_step=0)
    with pytest.raises(ValidationError):
        OproParams(history_score_threshold=1.5)
    with pytest.raises(ValidationError):
        OproParams(exemplar_selection="best")
    with pytest.raises(ValidationError):
        OproParams(instruction_position="Q_beginning")
    for name, preset in Opro.presets.items():
        assert OproParams(**preset), name
    small = OproParams(**Opro.presets["small"])
    assert (small.steps, small.candidates_per_step, small.optimizer_max_tokens, small.max_history) == (4, 4, 60, 10)


def test_class_attributes_and_registry() -> None:
    assert Opro.method == "opro" and Opro.params_model is OproParams
    assert Opro.optimizer_needs == frozenset({Capability.GENERATE}) and Opro.scorer_needs == frozenset()
    assert METHODS["opro"] is Opro and get_method("opro") is Opro
    with pytest.raises(KeyError, match="opro"):
        get_method("nope")


class StreamingOptimizerLLM(ScriptedOptimizerLLM):
    """Reports each reply through `on_result` in reverse order, and holds back all but the last one until the
    scorer has been asked about it: a step that waited for every proposal before scoring would hang."""

    def __init__(self, job_seed: int, scorer_called: asyncio.Event) -> None:
        super().__init__(job_seed)
        self.scorer_called = scorer_called

    async def generate(self, requests, on_result=None):
        answers = await super().generate(requests)
        order = list(reversed(range(len(answers))))
        on_result(order[0], answers[order[0]])
        await asyncio.wait_for(self.scorer_called.wait(), 5)
        for i in order[1:]:
            on_result(i, answers[i])
        return answers


async def test_proposals_are_scored_as_they_arrive_and_recorded_in_order() -> None:
    ctx, scorer, _ = make_ctx()
    called = asyncio.Event()
    ctx.optimizer_llm = StreamingOptimizerLLM(7, called)
    plain = scorer.label_logprobs

    async def noting(requests):
        called.set()
        return await plain(requests)

    scorer.label_logprobs = noting
    opro = make_opro()
    await opro.step(ctx)  # the initial prompt (sets the event, so reset it)
    called.clear()
    report = await opro.step(ctx)
    # the last proposal arrived first and was scored before the others were delivered
    assert ctx.evaluator.score_calls[1] == ["Proposal s1 i3"]
    assert [c.prompt for c in report.candidates] == [f"Proposal s1 i{i}" for i in range(4)]
    assert [h["instruction"] for h in opro.history[1:]] == [f"Proposal s1 i{i}" for i in range(4)]
