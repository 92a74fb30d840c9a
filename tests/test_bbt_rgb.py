"""BBT-RGB's options on bbt/bbtv2: the verbalizer ensemble (task level), the mixed initialisation (instruction plus
demonstrations from the train split), per-layer CMA-ES step sizes, the `bbt_rgb` preset, and a job on the local
model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from app.evaluation.demonstrations import compose, pick_demonstrations, render_demonstration
from app.evaluation.evaluator import Evaluator
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.jobs.engine import task_from_spec
from app.jobs.schemas import TaskIn
from app.llm.metered import MeteredLLM
from app.llm.port import BackendInfo, Capability, LabelScores, PrefixKind
from app.optimizers.base import OptimizerContext
from app.optimizers.bbt import Bbt, BbtParams, BbtV2, BbtV2Params, layer_sigmas
from app.usage import Budget, Usage
from tests.conftest import label_job, wait_for_status
from tests.test_bbt import GEOMETRY, WhiteBoxScorer, run

# ---------------------------------------------------------------------------------------------------------
# Verbalizer ensemble


def test_label_logprobs_average_each_labels_words():
    task = Task([], "{prompt}{input}", "label_accuracy", labels=["yes", "no", "maybe"])
    task.verbalizer = {"yes": [" Yes", " Sure"], "no": " No"}
    assert task.verbalizer_words() == [[" Yes", " Sure"], [" No"], [" maybe"]]
    assert task.verbalizer_texts() == [" Yes", " Sure", " No", " maybe"]
    # yes: mean(log 0.5, log 0.125) = log 0.25 (the geometric mean of the probabilities); one word: as it is.
    got = task.label_logprobs([math.log(0.5), math.log(0.125), math.log(0.2), math.log(0.05)])
    assert got == pytest.approx([math.log(0.25), math.log(0.2), math.log(0.05)])
    # A word the backend could not see (-inf, or the metered floor -1e9) does not count; none seen: the lowest.
    assert task.label_logprobs([-1e9, math.log(0.5), -1.0, -2.0]) == pytest.approx([math.log(0.5), -1.0, -2.0])
    assert task.label_logprobs([-math.inf, -1e9, -1.0, -2.0])[0] == -math.inf
    with pytest.raises(ValueError, match="3 log-probs for 4"):
        task.label_logprobs([0.0, 0.0, 0.0])


class WordScorer:
    """Fixed first-token log-probs per verbalizer text, whatever the prompt; records the texts asked for."""

    name = "words"

    def __init__(self, logprobs: dict[str, float]) -> None:
        self.logprobs = logprobs
        self.asked: list[tuple[str, ...]] = []
        self.info = BackendInfo("words", "scripted", "words-model", frozenset({Capability.LABEL_LOGPROBS}))

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text)

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            self.asked.append(request.verbalizers)
            scores = LabelScores([self.logprobs[v] for v in request.verbalizers], prompt_tokens=3)
            if on_result is not None:
                on_result(i, scores)
            out.append(scores)
        return out


async def test_evaluator_predicts_and_scores_by_the_ensemble_mean():
    # a's best word beats b, but a's mean does not: mean(log 0.6, log 0.01) = log sqrt(0.006) = log 0.0775 < log 0.2.
    scorer = WordScorer({" a1": math.log(0.6), " a2": math.log(0.01), " b": math.log(0.2), " c": -math.inf})
    task = Task(
        [Example("x", "a"), Example("y", "b")],
        "{prompt} {input}:",
        "label_accuracy",
        labels=["a", "b"],
        verbalizer={"a": [" a1", " a2"], "b": [" b", " c"]},  # " c" unseen: b is " b" alone
    )
    evaluator = Evaluator(task, MeteredLLM(scorer, usage=Usage(), budget=Budget(), store=None))
    ((row, _),) = await evaluator.label_logprobs(["Go."], task.examples)
    assert row == pytest.approx([0.5 * (math.log(0.6) + math.log(0.01)), math.log(0.2)])
    assert scorer.asked[0] == (" a1", " a2", " b", " c")  # every word, in one request per example
    assert await evaluator.predict(["Go."], task.examples) == [["b", "b"]]
    (score,) = await evaluator.score(["Go."], examples=task.examples)
    assert score.score == 0.5


def test_task_schema_takes_a_word_or_a_list_of_words():
    task = TaskIn(dataset="d", labels=["a", "b"], verbalizer={"a": [" A", " Alpha"], "b": " B"})
    assert task.verbalizer == {"a": [" A", " Alpha"], "b": " B"}
    with pytest.raises(ValidationError):
        TaskIn(dataset="d", labels=["a", "b"], verbalizer={"a": []})
    with pytest.raises(ValidationError):
        TaskIn(dataset="d", labels=["a", "b"], verbalizer={"a": [" w"] * 65})
    with pytest.raises(ValidationError):
        TaskIn(dataset="d", labels=["a", "b"], verbalizer={"a": 3})


# ---------------------------------------------------------------------------------------------------------
# Mixed initialisation


def test_demonstrations_take_labels_in_turn_and_depend_only_on_the_seed():
    targets = ["a", "b", "c", "a", "b", "a", "a"]
    labels = ["a", "b", "c"]
    three = pick_demonstrations(targets, labels, 3, seed=5)
    assert sorted(targets[i] for i in three) == ["a", "b", "c"]  # one per label
    assert pick_demonstrations(targets, labels, 3, seed=5) == three
    assert len({tuple(pick_demonstrations(targets, labels, 3, seed=s)) for s in range(8)}) > 1
    five = pick_demonstrations(targets, labels, 5, seed=5)
    assert len(set(five)) == 5 and sorted(targets[i] for i in five).count("c") == 1  # c has one example only
    assert len(pick_demonstrations(targets, labels, 50, seed=5)) == len(targets)  # all there are
    one = pick_demonstrations(targets, labels, 1, seed=5)
    assert len(one) == 1


def test_a_demonstration_is_rendered_as_a_query_with_its_label():
    task = Task(
        [],
        "{prompt}\n{input}\nAnswer:",
        "label_accuracy",
        labels=["yes", "no"],
        verbalizer={"yes": [" Yes", " Sure"], "no": " No"},
    )
    assert render_demonstration(task, Example("Is it? " + "x" * 50, "yes"), 10) == "Is it? xxx\nAnswer: Yes"
    assert render_demonstration(task, Example("Really", "no"), 10) == "Really\nAnswer: No"
    assert compose("Answer. ", ["d1", "d2"], "instruction_first") == "Answer.\n\nd1\n\nd2"
    assert compose("Answer. ", [], "instruction_first") == "Answer. "  # none: the instruction untouched


def signs_ctx(scorer=None, n: int = 24) -> OptimizerContext:
    """A label task whose inputs name themselves, so a prompt shows which examples it contains."""
    scorer = scorer or WhiteBoxScorer()
    examples = [Example(f"{'pos' if i % 2 == 0 else 'neg'} item#{i}#", "yes" if i % 2 == 0 else "no") for i in range(n)]
    task = Task(
        examples, "{prompt}\n{input}\nAnswer:", "label_accuracy", labels=["yes", "no"], split=SplitSpec(0.5, 0.25, 0.25)
    )
    llm = MeteredLLM(scorer, usage=Usage(), budget=Budget(), store=None)
    return OptimizerContext(evaluator=Evaluator(task, llm), optimizer_llm=llm, initial_prompt="Answer yes or no.")


@pytest.mark.parametrize("method", [Bbt, BbtV2])
async def test_mixed_initialisation_shows_train_examples_only_and_never_scores_them(method):
    params_model = BbtParams if method is Bbt else BbtV2Params
    params = params_model(
        prompt_length=3, intrinsic_dim=4, popsize=4, budget=8, demonstrations=3, insertion="add", train_subset=5
    )
    ctx = signs_ctx()
    task = ctx.evaluator.task
    train, held_out = task.split_examples("train"), task.split_examples("dev") + task.split_examples("test")
    optimizer = method(params, seed=7)
    reports = await run(optimizer, ctx)
    initial = reports[0].candidates[0]
    positions = initial.details["demonstrations"]
    assert len(positions) == 3 and {train[i].target for i in positions} == {"yes", "no"}
    hard = optimizer.instruction
    assert initial.prompt == hard and hard.startswith("Answer yes or no.\n\n")
    for i in positions:
        assert f"{train[i].input}\nAnswer: {train[i].target}" in hard
    shown = {ex.input for ex in train + held_out if ex.input in hard}
    assert shown == {train[i].input for i in positions}  # nothing from dev or test
    assert not set(positions) & set(optimizer.scoring_positions) and len(optimizer.scoring_positions) == 5

    # The same seed picks the same demonstrations and scoring set; another seed others.
    again = method(params, seed=7)
    await again.step(signs_ctx())
    assert again.instruction == hard and again.scoring_positions == optimizer.scoring_positions
    other = method(params, seed=8)
    await other.step(signs_ctx())
    assert other.instruction != hard

    # Every soft prompt carries the hard prompt, and its artifact rebuilds it (what predict scores).
    last = reports[-1].candidates[0]
    assert last.scoring_prompt.text == hard and last.scoring_prompt.prefix.anchor == hard
    rebuilt = method.prompt_from_artifact(json.loads(json.dumps(last.artifact)))
    assert rebuilt.text == hard and rebuilt.prefix == last.scoring_prompt.prefix
    assert last.artifact["demonstrations"] == 3

    # A resumed job keeps them.
    resumed = method(params, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(optimizer.state_dict())))
    assert resumed.instruction == hard and resumed.scoring_positions == optimizer.scoring_positions


async def test_without_demonstrations_the_scoring_set_is_every_methods():
    from app.optimizers.base import subset_positions

    optimizer = Bbt(BbtParams(train_subset=5), seed=3)
    ctx = signs_ctx()
    optimizer.scoring_examples(ctx)
    assert optimizer.scoring_positions == subset_positions(12, 5, 3, Bbt.subset_purpose)
    assert optimizer.hard_prompt(ctx) == "Answer yes or no."


# ---------------------------------------------------------------------------------------------------------
# Per-layer step sizes


def test_layer_sigma_schedules():
    assert layer_sigmas(1.0, None, "step", 3) == [1.0, 1.0, 1.0]
    assert layer_sigmas(1.0, 0.2, "step", 4) == [1.0, 0.2, 0.2, 0.2]
    assert layer_sigmas(1.0, 0.2, "linear", 5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert layer_sigmas(1.0, 0.2, "exp", 3) == pytest.approx(
        [1.0, 0.2 + 0.8 * math.exp(-0.2), 0.2 + 0.8 * math.exp(-0.4)]
    )
    assert layer_sigmas(1.0, 0.2, "linear", 1) == [1.0]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [({}, [0.2, 0.2, 0.2]), ({"sigma": 1.0, "sigma2": 0.2}, [1.0, 0.2, 0.2])],
)
async def test_each_layer_search_starts_at_its_own_step_size(extra, expected):
    params = BbtV2Params(prompt_length=2, intrinsic_dim=5, popsize=4, budget=24, train_subset=4, alpha=0.5, **extra)
    optimizer = BbtV2(params, seed=4)
    ctx = signs_ctx()
    await optimizer.step(ctx)
    # Each layer's first population is drawn around 0 with its own step size: z = sigma_l * N(0, I).
    spreads = [float(np.std(optimizer._search(layer).ask())) for layer in range(3)]
    assert spreads[1] / spreads[0] == pytest.approx(expected[1] / expected[0], rel=0.5)
    assert spreads[2] / spreads[1] == pytest.approx(1.0, rel=0.5)
    reports = [None, *await run(optimizer, ctx)]
    assert [optimizer.searches[layer].settings.sigma for layer in range(3)] == expected
    assert [optimizer.searches[layer].es.sigma0 for layer in range(3)] == expected
    # The projections keep `sigma` (layer 0's) in their std, as BBT-RGB's: alpha * s_l / (sqrt(d) * sigma).
    sigma = params.sigma
    assert optimizer.scale["stds"] == pytest.approx([0.5 * (2.0 + i) / (math.sqrt(5) * sigma) for i in range(3)])
    # A resumed job rebuilds each layer's search with its step size.
    resumed = BbtV2(params, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(optimizer.state_dict())))
    assert [resumed._search(layer).settings.sigma for layer in range(3)] == expected
    assert len(reports) == 1 + 2 * GEOMETRY["num_layers"]


# ---------------------------------------------------------------------------------------------------------
# The preset


def test_bbt_rgb_presets_validate_and_turn_the_options_on():
    bbt = BbtParams(**Bbt.presets["bbt_rgb"])
    assert (bbt.insertion, bbt.alpha, bbt.sigma, bbt.demonstrations) == ("add", 0.5, 1.0, 1)
    assert bbt.budget == 8000 and bbt.budget2 > 0
    v2 = BbtV2Params(**BbtV2.presets["bbt_rgb"])
    assert (v2.sigma, v2.sigma2, v2.sigma_schedule, v2.alpha) == (1.0, 0.2, "step", 0.5)
    assert v2.insertion == "add" and v2.demonstrations == 1 and v2.budget2 == bbt.budget2
    # Plain defaults are unchanged.
    assert BbtV2Params().sigma2 is None and BbtV2Params().sigma == 0.2 and BbtParams().demonstrations == 0


async def test_methods_list_the_bbt_rgb_presets(app_client):
    methods = {m["name"]: m for m in (await app_client.get("/v1/methods")).json()}
    assert methods["bbt"]["presets"]["bbt_rgb"] == Bbt.presets["bbt_rgb"]
    assert methods["bbtv2"]["presets"]["bbt_rgb"]["sigma2"] == 0.2
    assert methods["bbtv2"]["presets"]["bbt_rgb"]["sigma"] == 1.0
    for name in ("bbt", "bbtv2"):
        properties = methods[name]["parameters"]["properties"]
        assert {"demonstrations", "demonstration_chars"} <= set(properties)
        assert properties["demonstrations"]["default"] == 0
        calls = methods[name]["expected_calls"]
        assert calls["bbt_rgb"] > calls["paper"]  # the COBYLA stage on top
    assert {"sigma2", "sigma_schedule"} <= set(methods["bbtv2"]["parameters"]["properties"])
    assert "sigma2" not in methods["bbt"]["parameters"]["properties"]


# ---------------------------------------------------------------------------------------------------------
# The local model: at z = 0 the soft prompt is exactly the hard prompt (instruction + demonstrations)


@pytest.fixture(scope="module")
async def local_backend():
    from app.llm.registry import BackendRegistry
    from app.settings import BackendSettings, Settings

    registry = BackendRegistry(Settings(backends={"local": BackendSettings(kind="local", batch_size=8)}))
    backend = await registry.get("local")
    yield backend
    await registry.aclose()


TOPICS = [
    ("Apple Inc. makes phones and computers.", "company"),
    ("A small village in Poland near the river.", "village"),
    ("The Eiffel Tower is a landmark in Paris.", "building"),
    ("Toyota builds cars in Japan.", "company"),
    ("A hamlet of 200 people in the hills of Wales.", "village"),
    ("The Chrysler Building stands in New York.", "building"),
    ("Siemens is an engineering firm from Germany.", "company"),
    ("A farming village in rural Hungary.", "village"),
]


def largest_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("method", [Bbt, BbtV2])
async def test_at_z_zero_the_soft_prompt_is_the_instruction_with_demonstrations(local_backend, method):
    task = Task(
        [Example(text, label) for text, label in TOPICS],
        "{prompt}\nText: {input}\nTopic:",
        "label_accuracy",
        labels=["company", "village", "building"],
        split=SplitSpec(0.75, 0.125, 0.125),
    )
    llm = MeteredLLM(local_backend, usage=Usage(), budget=Budget(), store=None)
    ctx = OptimizerContext(Evaluator(task, llm), llm, initial_prompt="Classify the text.")
    params_model = BbtParams if method is Bbt else BbtV2Params
    params = params_model(
        prompt_length=6, intrinsic_dim=4, popsize=2, budget=2, insertion="add", demonstrations=2, train_subset=3
    )
    optimizer = method(params, seed=1)
    await optimizer.step(ctx)  # step 0: the hard prompt scored, the scales measured
    hard = optimizer.instruction
    assert hard.startswith("Classify the text.\n\n") and hard.count("\nTopic: ") == 2
    examples = task.split_examples("dev") + task.split_examples("test") + optimizer.scoring_examples(ctx)[:1]

    zero = np.zeros(params.intrinsic_dim)
    artifact, soft = optimizer.soft_prompt(zero) if method is Bbt else optimizer.soft_prompt(0, zero)
    assert soft.prefix.kind in (PrefixKind.INPUT_ADD, PrefixKind.DEEP_ADD) and not soft.prefix.vectors.any()
    moved = np.full(params.intrinsic_dim, 3.0)
    _, nonzero = optimizer.soft_prompt(moved) if method is Bbt else optimizer.soft_prompt(0, moved)
    plain, as_text, at_zero, away = await ctx.evaluator.label_logprobs(
        ["Classify the text.", hard, soft, nonzero], examples
    )
    assert largest_gap(as_text, at_zero) <= 1e-5  # z = 0 adds nothing: the hard prompt's log-probs
    assert largest_gap(plain, as_text) > 1e-3  # and that prompt is not the instruction alone: the demos are seen
    moved_effect = largest_gap(away, as_text)
    assert moved_effect > 1e-4  # a non-zero z is seen

    text_preds, zero_preds = await ctx.evaluator.predict([hard, soft], examples)
    assert zero_preds == text_preds
    # What predict rebuilds from the stored artifact is that same prompt.
    rebuilt = method.prompt_from_artifact(json.loads(json.dumps(artifact)))
    assert rebuilt.text == hard and rebuilt.prefix == soft.prefix


# ---------------------------------------------------------------------------------------------------------
# A job with the preset, on the local model, with a verbalizer ensemble


async def test_bbt_job_with_the_bbt_rgb_preset_on_the_local_model(app_client, worker):
    body = label_job(method="bbt", backends={"scorer": "local", "optimizer": "local"}, budget={"max_llm_calls": 200})
    body["task"] = {
        "dataset": "builtin:snli16",
        "labels": ["entailment", "neutral", "contradiction"],
        "verbalizer": {"entailment": [" Yes", " True"], "neutral": [" Maybe", " Perhaps"], "contradiction": " No"},
        "split": {"train": 0.7, "dev": 0.15, "test": 0.15},
    }
    body["seed"] = 2
    body["params"] = {
        "preset": "bbt_rgb",
        "prompt_length": 8,
        "intrinsic_dim": 6,
        "popsize": 4,
        "budget": 4,
        "budget2": 2,
        "eval_every": 4,
        "train_subset": 3,
        "demonstration_chars": 100,
    }
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed" and job["progress"]["step"] == 2 == job["progress"]["total_steps"]
    assert 0 < job["usage"]["llm_calls"] <= 200
    spec = (await app_client.get(f"/v1/jobs/{job['id']}")).json()["spec"]
    assert spec["params"]["insertion"] == "add" and spec["params"]["alpha"] == 0.5
    assert spec["params"]["demonstrations"] == 1

    # Step 0 is the instruction followed by one training example and its label word.
    initial = job["initial"]["prompt"]
    assert initial.startswith("Decide whether the hypothesis follows from the premise.\n\nPremise: ")
    assert initial.endswith("Answer: Yes") or initial.endswith("Answer: Maybe") or initial.endswith("Answer: No")
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?limit=100")).json()["items"]
    stages = [c["details"].get("stage") for c in candidates if c["prompt"].startswith("[bbt soft prompt")]
    assert 1 <= stages.count("cobyla") <= 2 and len(stages) == 4 + stages.count("cobyla")
    assert all(c["prompt"].endswith(initial) for c in candidates if c["prompt"].startswith("[bbt soft prompt"))

    # predict renders the best prompt (soft or the hard one) as the search did: it reproduces the dev score.
    dataset = (await app_client.get("/v1/datasets/builtin:snli16?examples_limit=1000")).json()
    dev = task_from_spec(spec["task"], dataset["examples"]).split_examples("dev")
    predicted = await app_client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in dev]})
    assert predicted.status_code == 200, predicted.text
    outputs = [p["output"] for p in predicted.json()["predictions"]]
    accuracy = sum(o == ex.target for o, ex in zip(outputs, dev, strict=True)) / len(dev)
    assert accuracy == pytest.approx(job["best"]["dev_score"])
    if job["best"]["prompt"] != initial:
        artifact = (await app_client.get(f"/v1/jobs/{job['id']}/artifact")).json()
        assert artifact["text"] == initial and artifact["insertion"] == "add" and artifact["demonstrations"] == 1
