"""BBT and BBTv2: projections and prefix shapes, the CMA-ES wrapper, losses, optimizer runs and resume against a
scripted white-box scorer, the local model's prefix scoring, and jobs through the HTTP API."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest

from app.evaluation.evaluator import Evaluator
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.jobs.engine import task_from_spec
from app.llm.metered import MeteredLLM
from app.llm.port import (
    BackendError,
    BackendInfo,
    Capability,
    ContinuousPrefix,
    LabelScoreRequest,
    LabelScores,
    PrefixKind,
    placeholder_span,
)
from app.llm.registry import BackendRegistry
from app.main import create_app
from app.optimizers.base import OptimizerContext
from app.optimizers.bbt import Bbt, BbtParams, BbtV2, BbtV2Params, loss_and_accuracy
from app.optimizers.bbt.cmaes import CmaSearch, CmaSettings
from app.optimizers.bbt.projection import (
    input_projection,
    layer_projection,
    soft_prompt_from_artifact,
)
from app.usage import Budget, Usage
from tests.conftest import label_job, running_worker, wait_for_status

GEOMETRY = {"hidden_size": 6, "num_layers": 3, "num_kv_heads": 2, "head_dim": 4, "max_positions": 512}
LABELS = ["yes", "no"]

# ---------------------------------------------------------------------------------------------------------
# Projections, prefixes, losses


def test_projection_shapes_and_scales():
    a = input_projection(seed=3, dim=40, length=5, hidden=64, std=0.1)
    assert a.shape == (40, 5 * 64) and a.dtype == np.float32
    assert abs(float(a.std()) - 0.1) < 0.01
    assert np.array_equal(a, input_projection(3, 40, 5, 64, 0.1))  # drawn from the seed, never stored
    assert not np.array_equal(a, input_projection(4, 40, 5, 64, 0.1))

    layer = layer_projection(seed=3, layer=1, dim=40, length=5, kv_heads=3, head_dim=8, key_std=1.0, value_std=0.01)
    assert layer.shape == (40, 2 * 3 * 5 * 8)
    keys, values = layer.reshape(40, 2, -1)[:, 0], layer.reshape(40, 2, -1)[:, 1]
    assert abs(float(keys.std()) - 1.0) < 0.1 and abs(float(values.std()) - 0.01) < 0.001
    assert not np.array_equal(layer, layer_projection(3, 2, 40, 5, 3, 8, 1.0, 0.01))


def _artifact(method: str, z) -> dict:
    return {
        "version": 1,
        "method": method,
        "model_id": "m",
        "geometry": GEOMETRY,
        "projection_seed": 7,
        "prompt_length": 4,
        "intrinsic_dim": 5,
        "alpha": 1.0,
        "sigma": 1.0,
        "std": 0.2,
        "stds": [[0.5, 0.1]] * GEOMETRY["num_layers"],
        "z": z,
        "text": "Classify.",
    }


def test_artifact_rebuilds_prefix_of_the_right_shape():
    bbt = soft_prompt_from_artifact(_artifact("bbt", [0.1, -0.2, 0.3, 0.0, 1.0]))
    assert bbt.prefix.kind == PrefixKind.INPUT and bbt.prefix.vectors.shape == (4, 6)
    assert bbt.text == "Classify." and bbt.description.startswith("[bbt soft prompt: 4 vectors")
    again = soft_prompt_from_artifact(_artifact("bbt", [0.1, -0.2, 0.3, 0.0, 1.0]))
    assert again.prefix == bbt.prefix and again.description == bbt.description

    zs = [[0.0] * 5, [1.0, 0, 0, 0, 0], [0.0, 2.0, 0, 0, 0]]
    deep = soft_prompt_from_artifact(_artifact("bbtv2", zs))
    assert deep.prefix.kind == PrefixKind.DEEP and deep.prefix.vectors.shape == (3, 2, 2, 4, 4)
    assert not deep.prefix.vectors[0].any() and deep.prefix.vectors[1].any()  # z = 0: a zero prefix
    assert deep.prefix.length == 4


def test_additive_artifact_rebuilds_and_old_versions_load():
    v2 = {**_artifact("bbt", [0.1, -0.2, 0.3, 0.0, 1.0]), "version": 2, "insertion": "add"}
    v2["placeholder"] = "instruction"
    bbt = soft_prompt_from_artifact(v2)
    assert bbt.prefix.kind == PrefixKind.INPUT_ADD and bbt.prefix.vectors.shape == (4, 6)
    assert bbt.prefix.anchor == "Classify." and bbt.prefix.length == 0 and bbt.prefix.rows == 4
    assert "vectors added to the instruction" in bbt.description
    # The same z in the old (prepend) form: the same vectors, put in front instead.
    old = soft_prompt_from_artifact(_artifact("bbt", [0.1, -0.2, 0.3, 0.0, 1.0]))
    assert np.array_equal(old.prefix.vectors, bbt.prefix.vectors) and old.prefix != bbt.prefix

    zs = [[0.0] * 5, [1.0, 0, 0, 0, 0], [0.0, 2.0, 0, 0, 0]]
    deep_artifact = {**_artifact("bbtv2", zs), "version": 2, "insertion": "add", "placeholder": "instruction"}
    deep_artifact["stds"] = [0.5, 0.2, 0.1]
    deep = soft_prompt_from_artifact(deep_artifact)
    assert deep.prefix.kind == PrefixKind.DEEP_ADD and deep.prefix.vectors.shape == (3, 4, 6)
    assert not deep.prefix.vectors[0].any() and deep.prefix.vectors[1].any()  # z = 0: adds nothing
    prepend = soft_prompt_from_artifact({**_artifact("bbtv2", zs), "version": 2, "insertion": "prepend"})
    assert prepend.prefix.kind == PrefixKind.DEEP

    with pytest.raises(ValueError, match="version 3"):
        soft_prompt_from_artifact({**v2, "version": 3})
    with pytest.raises(ValueError, match="placeholder"):
        soft_prompt_from_artifact({**v2, "placeholder": "vocabulary"})


def test_additive_prefix_needs_an_anchor_and_finds_its_tokens():
    with pytest.raises(ValueError, match="anchor"):
        ContinuousPrefix.of(PrefixKind.INPUT_ADD, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="anchor"):
        ContinuousPrefix.of(PrefixKind.INPUT, np.zeros((2, 3)), anchor="x")
    a = ContinuousPrefix.of(PrefixKind.INPUT_ADD, np.zeros((2, 3)), anchor="Classify.")
    assert a != ContinuousPrefix.of(PrefixKind.INPUT_ADD, np.zeros((2, 3)), anchor="Classify!")
    # ids of the prompt, of its text before the anchor, and through the anchor's end
    assert placeholder_span([1, 5, 6, 7, 8], [1], [1, 5, 6, 7], rows=10) == (1, 4)
    assert placeholder_span([1, 5, 6, 7, 8], [1], [1, 5, 6, 7], rows=2) == (1, 3)  # at most `rows`
    assert placeholder_span([5, 6, 9, 8], [], [5, 6, 7], rows=10) == (0, 2)  # a token merged across the end
    with pytest.raises(BackendError, match="no tokens"):
        placeholder_span([5, 6], [5, 6], [5, 6], rows=3)


def test_prefix_identity_is_its_content():
    a = ContinuousPrefix.of(PrefixKind.INPUT, np.ones((2, 3)))
    assert a == ContinuousPrefix.of(PrefixKind.INPUT, np.ones((2, 3), dtype=np.float64))
    assert a != ContinuousPrefix.of(PrefixKind.INPUT, np.ones((3, 2)))
    request = LabelScoreRequest("p", (" a",), a)
    assert request.cache_payload()["prefix"] == a.digest
    assert "prefix" not in LabelScoreRequest("p", (" a",)).cache_payload()  # plain keys unchanged


def test_losses():
    lp = [[math.log(0.75), math.log(0.25)], [math.log(0.5), math.log(0.5)]]
    ce, acc = loss_and_accuracy(lp, [0, 1], "ce")
    assert ce == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    assert acc == 0.5  # a tie goes to the first label
    hinge, _ = loss_and_accuracy([[0.0, -3.0], [-1.0, 0.0]], [0, 0], "hinge")
    assert hinge == pytest.approx((0.0 + (0.0 - -1.0 + 2.0)) / 2)


# ---------------------------------------------------------------------------------------------------------
# CMA-ES wrapper


def test_cma_reduces_a_quadratic_and_restores_exactly():
    target = np.linspace(-1, 1, 12)
    settings = CmaSettings(dim=12, sigma=0.5, popsize=8, seed=11, key=(0,))
    search = CmaSearch(settings)
    first = None
    for _ in range(40):
        population = search.ask()
        losses = [float(np.sum((x - target) ** 2)) for x in population]
        first = first if first is not None else min(losses)
        search.tell(population, losses)
    assert search.best_loss < first / 20
    assert np.sum((search.best_x - target) ** 2) == pytest.approx(search.best_loss)

    restored = CmaSearch.restore(settings, json.loads(json.dumps(search.state_dict())))
    assert np.array_equal(restored.ask(), search.ask())
    assert restored.best_loss == search.best_loss and np.array_equal(restored.best_x, search.best_x)
    with pytest.raises(ValueError):
        search.tell(np.zeros((8, 12)), [0.0] * 8)  # not the population asked for


def test_cma_bound_keeps_samples_inside():
    search = CmaSearch(CmaSettings(dim=4, sigma=5.0, popsize=6, seed=1, key=(0,), bound=1.0))
    population = search.ask()
    assert np.all(np.abs(population) <= 1.0 + 1e-12)


# ---------------------------------------------------------------------------------------------------------
# A scripted white-box scorer: one direction of the prefix helps every example.


class WhiteBoxScorer:
    """Label log-probs from the prefix: u = <prefix, w>; an example marked 'pos' prefers `yes` by u, 'neg' by -u.
    Without a prefix u = 0 (both labels equally likely)."""

    name = "whitebox"

    def __init__(
        self, capabilities=(Capability.INPUT_EMBEDDINGS, Capability.DEEP_PROMPT), model_id: str = "whitebox-model"
    ) -> None:
        self.calls = 0
        self._info = BackendInfo(
            "whitebox",
            "scripted",
            model_id,
            frozenset({Capability.LABEL_LOGPROBS, *capabilities}),
            geometry=dict(GEOMETRY),
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.split()) + 4

    async def embedding_std(self) -> float:
        return 0.5

    async def kv_statistics(self, prompts):
        assert prompts
        return [(1.0 + layer, 0.5) for layer in range(GEOMETRY["num_layers"])]

    async def hidden_statistics(self, prompts):
        assert prompts
        return [2.0 + layer for layer in range(GEOMETRY["num_layers"])]

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            u = 0.0
            if request.prefix is not None:
                flat = request.prefix.vectors.astype(np.float64).ravel()
                u = float(np.tanh(flat @ np.cos(np.arange(flat.size))))
            sign = 1.0 if "pos" in request.prompt else -1.0
            scores = LabelScores([sign * u, -sign * u], prompt_tokens=5)
            self.calls += 1
            if on_result is not None:
                on_result(i, scores)
            out.append(scores)
        return out


def make_ctx(scorer: WhiteBoxScorer | None = None, n: int = 12) -> OptimizerContext:
    scorer = scorer or WhiteBoxScorer()
    examples = [Example(f"{'pos' if i % 2 == 0 else 'neg'} item {i}", "yes" if i % 2 == 0 else "no") for i in range(n)]
    task = Task(
        examples, "{prompt}\n{input}\nAnswer:", "label_accuracy", labels=LABELS, split=SplitSpec(0.5, 0.25, 0.25)
    )
    llm = MeteredLLM(scorer, usage=Usage(), budget=Budget(), store=None)
    return OptimizerContext(evaluator=Evaluator(task, llm), optimizer_llm=llm, initial_prompt="Answer yes or no.")


async def run(optimizer, ctx, steps: int | None = None) -> list:
    reports = []
    while not optimizer.done and (steps is None or len(reports) < steps):
        reports.append(await optimizer.step(ctx))
    return reports


def summary(reports) -> list:
    return [[(c.prompt, c.score, c.details["loss"]) for c in r.candidates] for r in reports]


async def test_bbt_lowers_the_loss_and_reports_artifacts():
    params = BbtParams(prompt_length=3, intrinsic_dim=10, popsize=6, budget=60, eval_every=18, train_subset=4)
    optimizer = Bbt(params, seed=2)
    ctx = make_ctx()
    reports = await run(optimizer, ctx)
    assert optimizer.total_steps == 10 and len(reports) == 11
    initial = reports[0].candidates[0]
    assert initial.prompt == "Answer yes or no." and initial.details["loss"] == pytest.approx(math.log(2))
    assert initial.artifact is None
    generation_best = [min(c.details["loss"] for c in r.candidates) for r in reports[1:]]
    assert min(generation_best) < 0.5 * math.log(2)
    # Every candidate names a distinct soft prompt and carries the artifact that rebuilds it.
    names = [c.prompt for r in reports[1:] for c in r.candidates]
    assert len(set(names)) == len(names)
    candidate = reports[-1].candidates[0]
    rebuilt = Bbt.prompt_from_artifact(json.loads(json.dumps(candidate.artifact)))
    assert rebuilt.prefix == candidate.scoring_prompt.prefix and rebuilt.description == candidate.prompt
    assert rebuilt.prefix.vectors.shape == (3, GEOMETRY["hidden_size"])
    # Dev selection every eval_every (18) evaluations = every 3 generations, and after the last.
    assert [r.select for r in reports[1:]] == [False, False, True, False, False, True, False, False, True, True]
    for r in reports[1:]:
        assert r.candidates[r.leader].details["loss"] == min(c.details["loss"] for c in r.candidates)
    assert len(optimizer.scoring_positions) == 4


async def test_bbt_resumed_equals_uninterrupted():
    params = BbtParams(prompt_length=2, intrinsic_dim=6, popsize=4, budget=24, budget2=5, train_subset=4)
    uninterrupted = Bbt(params, seed=9)
    reference = await run(uninterrupted, make_ctx())

    first = Bbt(params, seed=9)
    head = await run(first, make_ctx(), steps=4)
    state = json.loads(json.dumps(first.state_dict()))
    second = Bbt(params, seed=9)
    second.load_state_dict(state)
    tail = await run(second, make_ctx())
    assert summary(head + tail) == summary(reference)
    assert second.z == uninterrupted.z and second.evaluations == uninterrupted.evaluations
    cobyla = (head + tail)[-1]
    assert 1 <= len(cobyla.candidates) <= 5 and all(c.details["stage"] == "cobyla" for c in cobyla.candidates)


@pytest.mark.parametrize("insertion", ["add", "prepend"])
async def test_bbtv2_sweeps_layers_and_resumes(insertion):
    params = BbtV2Params(prompt_length=2, intrinsic_dim=5, popsize=4, budget=24, train_subset=4, insertion=insertion)
    optimizer = BbtV2(params, seed=4)
    assert optimizer.total_steps == 6  # before the model is known: one layer assumed
    ctx = make_ctx()
    reports = await run(optimizer, ctx)
    # 24 // (4 * 3 layers) = 2 rounds of 3 layers
    assert optimizer.total_steps == 6 and len(reports) == 7
    assert [(c.details["round"], c.details["layer"]) for c in (r.candidates[0] for r in reports[1:])] == [
        (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)
    ]  # fmt: skip
    last = reports[-1].candidates[0]
    if insertion == "prepend":
        # Per-layer scales from the key/value statistics: alpha * s / (sqrt(d) * sigma)
        assert optimizer.scale["stds"][2] == pytest.approx(
            [0.2 * 3.0 / (math.sqrt(5) * 0.2), 0.2 * 0.5 / math.sqrt(5) / 0.2]
        )
        assert last.scoring_prompt.prefix.vectors.shape == (3, 2, 2, 2, 4)
    else:  # from the hidden-state statistics
        assert optimizer.scale["stds"][2] == pytest.approx(0.2 * 4.0 / (math.sqrt(5) * 0.2))
        assert last.scoring_prompt.prefix.vectors.shape == (3, 2, 6)
        assert last.scoring_prompt.prefix.anchor == "Answer yes or no." and last.artifact["insertion"] == "add"
    assert BbtV2.prompt_from_artifact(last.artifact).prefix == last.scoring_prompt.prefix
    assert min(c.details["loss"] for c in reports[-1].candidates) < math.log(2)

    first = BbtV2(params, seed=4)
    head = await run(first, make_ctx(), steps=3)
    second = BbtV2(params, seed=4)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    tail = await run(second, make_ctx())
    assert summary(head + tail) == summary(reports)


async def test_bbtv2_additive_sweep_never_leaves_a_layer_worse_than_it_found_it():
    """The add form starts at the manual prompt: a layer takes a sample only if it lowers the whole combination's
    train loss, so the running loss never rises above the manual prompt's, and a layer whose samples all lose keeps
    its zero (its z stays unset)."""
    params = BbtV2Params(prompt_length=2, intrinsic_dim=5, popsize=4, budget=72, train_subset=4, insertion="add")
    optimizer = BbtV2(params, seed=4)
    ctx = make_ctx()
    initial = (await optimizer.step(ctx)).candidates[0]
    running = [optimizer.loss]
    assert running[0] == initial.details["loss"]
    kept_any = rejected_any = False
    while not optimizer.done:
        report = await optimizer.step(ctx)
        best_sample = min(c.details["loss"] for c in report.candidates)
        layer = report.candidates[0].details["layer"]
        if optimizer.loss != running[-1]:
            kept_any = True
            assert optimizer.z[layer] is not None and optimizer.loss == pytest.approx(best_sample, abs=1e-6)
        else:
            rejected_any = True
            assert best_sample >= running[-1] - 1e-6  # reported losses are rounded to 6 digits
        running.append(optimizer.loss)
    assert all(b <= a for a, b in zip(running, running[1:], strict=False))
    assert kept_any and rejected_any  # this seed exercises both branches
    resumed = BbtV2(params, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(optimizer.state_dict())))
    assert resumed.loss == optimizer.loss and resumed.z == optimizer.z


def test_bbt_params_and_task_checks():
    assert Bbt.presets["small"]["prompt_length"] < BbtParams().prompt_length
    assert BbtV2Params().sigma == 0.2 and BbtParams().sigma == 1.0
    # Defaults chosen by the dbpedia16 benchmark (README): prepend won for BBT, add for BBTv2.
    assert BbtParams().insertion == "prepend" and BbtV2Params().insertion == "add"
    problems = Bbt.check_task({"metric": "exact_match", "labels": None})
    assert problems and problems[0][0] == ["metric"]
    assert Bbt.check_task({"metric": "label_accuracy", "labels": ["a", "b"]}) == []


async def test_metered_llm_refuses_a_prefix_the_backend_cannot_take():
    scorer = WhiteBoxScorer(capabilities=(Capability.INPUT_EMBEDDINGS,))
    llm = MeteredLLM(scorer, usage=Usage(), budget=Budget(), store=None)
    deep = ContinuousPrefix.of(PrefixKind.DEEP, np.zeros((3, 2, 2, 1, 4)))
    with pytest.raises(Exception, match="deep_prompt"):
        await llm.label_logprobs([LabelScoreRequest("x", (" a",), deep)])
    assert scorer.calls == 0


# ---------------------------------------------------------------------------------------------------------
# The local model: prefixes change the answer, and a batch gives each row what it would get alone.


@pytest.fixture(scope="module")
async def local_backend(tmp_path_factory):
    from app.llm.registry import BackendRegistry
    from app.settings import BackendSettings, Settings

    registry = BackendRegistry(Settings(backends={"local": BackendSettings(kind="local", batch_size=8)}))
    backend = await registry.get("local")
    yield backend
    await registry.aclose()


@pytest.mark.parametrize("kind", ["input", "deep"])
async def test_local_prefix_batched_equals_single(local_backend, kind):
    g = local_backend.info.geometry
    assert g["hidden_size"] == 576 and g["num_layers"] == 30 and g["num_kv_heads"] == 3 and g["head_dim"] == 64
    rng = np.random.default_rng(0)
    shape = (3, 576) if kind == "input" else (30, 2, 3, 3, 64)
    prefixes = [ContinuousPrefix.of(PrefixKind(kind), rng.normal(0, 0.3, shape)) for _ in range(2)]
    prompts = [
        "Is the sky blue? Answer:",
        "A long review of a film that was really great fun to watch. Good? Answer:",
        "",
    ]
    requests = [LabelScoreRequest(p, (" yes", " no"), prefixes[i % 2]) for i, p in enumerate(prompts)]
    batched = await local_backend.label_logprobs(requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = await local_backend.label_logprobs([request])
        assert together.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert together.prompt_tokens == alone.prompt_tokens
    (plain,) = await local_backend.label_logprobs([LabelScoreRequest(prompts[0], (" yes", " no"))])
    assert batched[0].prompt_tokens == plain.prompt_tokens + 3
    assert abs(batched[0].logprobs[0] - plain.logprobs[0]) > 1e-3  # the prefix is seen
    wrong = ContinuousPrefix.of(PrefixKind(kind), np.zeros((2, 7) if kind == "input" else (30, 2, 3, 2, 7)))
    with pytest.raises(Exception, match="does not fit"):
        await local_backend.label_logprobs([LabelScoreRequest("x", (" a",), wrong)])


LOCAL_INSTRUCTION = "Classify the text."
LOCAL_TEXTS = [
    "The Eiffel Tower is in Paris.",
    "A small village in Poland with a long and interesting history of trade and crafts.",
    "Apple Inc.",
]
LOCAL_VERBALIZERS = (" company", " village", " building")


def _additive(kind: str, rows: int, layer: int | None = None, seed: int = 0) -> ContinuousPrefix:
    shape = (rows, 576) if kind == "input_add" else (30, rows, 576)
    vectors = np.zeros(shape, dtype=np.float32)
    if layer is not None:
        noise = np.random.default_rng(seed).normal(0, 0.05 if kind == "input_add" else 1.0, shape[-2:])
        vectors[...] = noise if kind == "input_add" else 0.0
        if kind == "deep_add":
            vectors[layer] = noise
    return ContinuousPrefix.of(PrefixKind(kind), vectors, anchor=LOCAL_INSTRUCTION)


def _gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))


@pytest.mark.parametrize("template", ["{prompt}\nText: {input}\nTopic:", "Task. {prompt} Text: {input}\nTopic:"])
@pytest.mark.parametrize("kind", ["input_add", "deep_add"])
async def test_local_additive_prefix_at_zero_is_the_text_prompt(local_backend, kind, template):
    """z = 0: the plain prompt's log-probs, alone and in a batch with other prompts (plain ones too)."""
    prompts = [template.format(prompt=LOCAL_INSTRUCTION, input=text) for text in LOCAL_TEXTS]
    plain = await local_backend.label_logprobs([LabelScoreRequest(p, LOCAL_VERBALIZERS) for p in prompts])
    zero = _additive(kind, rows=8)
    requests = [LabelScoreRequest(p, LOCAL_VERBALIZERS, zero) for p in prompts]
    mixed = await local_backend.label_logprobs([*requests, LabelScoreRequest("Hello", LOCAL_VERBALIZERS)])
    for request, want, together in zip(requests, plain, mixed, strict=False):
        (alone,) = await local_backend.label_logprobs([request])
        assert _gap(together, want) <= 1e-5 and _gap(alone, want) <= 1e-5
        assert together.prompt_tokens == want.prompt_tokens  # the additive form adds no tokens


@pytest.mark.parametrize("kind", ["input_add", "deep_add"])
async def test_local_additive_prefix_is_seen_and_batch_independent(local_backend, kind):
    prompts = [f"{LOCAL_INSTRUCTION}\nText: {text}\nTopic:" for text in LOCAL_TEXTS]
    plain = await local_backend.label_logprobs([LabelScoreRequest(p, LOCAL_VERBALIZERS) for p in prompts])
    prefixes = [_additive(kind, rows=5, layer=7, seed=seed) for seed in (1, 2)]  # deep: layer 7 only
    requests = [LabelScoreRequest(p, LOCAL_VERBALIZERS, prefixes[i % 2]) for i, p in enumerate(prompts)]
    batched = await local_backend.label_logprobs(requests)
    for request, want, together in zip(requests, plain, batched, strict=True):
        (alone,) = await local_backend.label_logprobs([request])
        assert _gap(together, alone) <= 1e-5
        assert _gap(together, want) > 1e-3  # the vectors are seen
    elsewhere = LabelScoreRequest("No instruction here.", LOCAL_VERBALIZERS, prefixes[0])
    with pytest.raises(BackendError, match="does not occur"):
        await local_backend.label_logprobs([elsewhere])
    wrong = ContinuousPrefix.of(PrefixKind(kind), np.zeros((2, 7) if kind == "input_add" else (29, 2, 576)), "x")
    with pytest.raises(BackendError, match="does not fit"):
        await local_backend.label_logprobs([LabelScoreRequest("x", (" a",), wrong)])


async def test_local_scales(local_backend):
    std = await local_backend.embedding_std()
    assert 0.01 < std < 1.0
    stats = await local_backend.kv_statistics(["The cat sat on the mat.", "Paris is in France."])
    assert len(stats) == 30 and all(k > 0 and v > 0 for k, v in stats)
    hidden = await local_backend.hidden_statistics(["The cat sat on the mat.", "Paris is in France."])
    assert len(hidden) == 30 and all(h > 0 for h in hidden)
    assert hidden[0] == pytest.approx(std, rel=0.5)  # layer 0's input is the token embeddings


# ---------------------------------------------------------------------------------------------------------
# Through the HTTP API


async def test_bbt_job_with_local_model_and_predict_reproduces_dev(app_client, worker):
    body = label_job(method="bbt", backends={"scorer": "local", "optimizer": "local"}, budget={"max_llm_calls": 400})
    # A seed and a misleading manual prompt with which a soft prompt wins on dev at this tiny budget (measured).
    body["seed"] = 3
    body["initial_prompt"] = "Always answer No."
    body["params"] = {
        "preset": "small",
        "prompt_length": 2,
        "intrinsic_dim": 8,
        "popsize": 4,
        "budget": 8,
        "eval_every": 4,
        "train_subset": 4,
    }
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed" and job["progress"]["step"] == 2 == job["progress"]["total_steps"]
    assert 0 < job["usage"]["llm_calls"] <= 400
    assert job["best"]["test_score"] is not None and job["initial"]["test_score"] is not None

    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?limit=100")).json()["items"]
    assert len(candidates) == 1 + 2 * 4
    soft = [c for c in candidates if c["prompt"].startswith("[bbt soft prompt")]
    assert len(soft) == 8 and all("loss" in c["details"] for c in soft)

    if job["best"]["prompt"] == job["initial"]["prompt"]:
        pytest.skip("no soft prompt beat the manual one on dev at this tiny budget")  # pragma: no cover
    artifact = (await app_client.get(f"/v1/jobs/{job['id']}/artifact")).json()
    assert artifact["method"] == "bbt" and len(artifact["z"]) == 8
    assert artifact["model_id"].startswith("local:")

    # predict applies the stored artifact: on the dev split it reproduces the reported dev score.
    spec = (await app_client.get(f"/v1/jobs/{job['id']}")).json()["spec"]
    dataset = (await app_client.get("/v1/datasets/builtin:snli16?examples_limit=1000")).json()
    dev = task_from_spec(spec["task"], dataset["examples"]).split_examples("dev")
    predicted = await app_client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in dev]})
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["prompt"] == job["best"]["prompt"]
    outputs = [p["output"] for p in predicted.json()["predictions"]]
    accuracy = sum(o == ex.target for o, ex in zip(outputs, dev, strict=True)) / len(dev)
    assert accuracy == pytest.approx(job["best"]["dev_score"])

    # A backend without input embeddings is refused, naming the capability.
    refused = await app_client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": ["x"], "backend": "default"})
    assert refused.status_code == 422
    assert "input_embeddings" in refused.text and refused.json()["error"]["details"][0]["loc"] == ["body", "backend"]


@pytest.fixture
async def whitebox_client(settings):
    """The API and a real SAQ worker on Postgres/Redis, with the scripted white-box scorer as backends
    `whitebox` and `whitebox-other` (another model)."""
    registry = BackendRegistry(
        settings, backends={"whitebox": WhiteBoxScorer(), "whitebox-other": WhiteBoxScorer(model_id="other-model")}
    )
    app = create_app(settings, registry=registry)
    async with running_worker(settings, registry), app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client
    await registry.aclose()


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
async def test_soft_prompt_job_stores_artifact_and_predict_reproduces_dev(whitebox_client, method):
    client = whitebox_client
    examples = [
        {"input": f"{'pos' if i % 3 else 'neg'} item {i}", "target": "yes" if i % 3 else "no"} for i in range(40)
    ]
    dataset = (await client.post("/v1/datasets", json={"name": "signs", "examples": examples})).json()
    body = {
        "method": method,
        "task": {
            "dataset": dataset["id"],
            "template": "{prompt}\n{input}\nAnswer:",
            "metric": "label_accuracy",
            "labels": ["yes", "no"],
        },
        "initial_prompt": "Answer yes or no.",
        "backends": {"scorer": "whitebox", "optimizer": "whitebox"},
        "params": {"prompt_length": 2, "intrinsic_dim": 6, "popsize": 8, "budget": 16, "eval_every": 8},
        "seed": 1,
    }
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, wait_s=60)
    assert job["status"] == "succeeded", job
    # Without a prefix the scorer is indifferent (ties go to "yes"); a prefix pointing the right way is perfect.
    assert job["initial"]["dev_score"] < 1.0
    assert job["best"]["prompt"].startswith(f"[{method} soft prompt") and job["best"]["dev_score"] == 1.0

    artifact = (await client.get(f"/v1/jobs/{job['id']}/artifact")).json()
    assert artifact["method"] == method and artifact["model_id"] == "whitebox-model"
    assert artifact["projection_seed"] == 1 and artifact["text"] == "Answer yes or no."
    missing = await client.get(f"/v1/jobs/{job['id']}/artifact?use=initial")
    assert missing.status_code == 404

    spec = (await client.get(f"/v1/jobs/{job['id']}")).json()["spec"]
    dev = task_from_spec(spec["task"], examples).split_examples("dev")
    predicted = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in dev]})
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["prompt"] == job["best"]["prompt"]
    outputs = [p["output"] for p in predicted.json()["predictions"]]
    assert sum(o == ex.target for o, ex in zip(outputs, dev, strict=True)) / len(dev) == job["best"]["dev_score"]
    initial = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [dev[0].input], "use": "initial"})
    assert initial.json()["prompt"] == "Answer yes or no."

    # Another model, or a backend without the capability, is refused with the field and the reason.
    other = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": ["pos x"], "backend": "whitebox-other"})
    assert other.status_code == 422 and "do not transfer" in other.text
    capability = "input_embeddings" if method == "bbt" else "deep_prompt"
    text_only = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": ["pos x"], "backend": "default"})
    assert text_only.status_code == 422 and capability in text_only.text
    assert text_only.json()["error"]["details"][0]["loc"] == ["body", "backend"]


async def test_bbtv2_refused_on_a_backend_without_deep_prompt(app_client):
    body = label_job(method="bbtv2", backends={"scorer": "default", "optimizer": "default"})
    body["params"] = {"preset": "small"}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["loc"][-2:] == ["backends", "scorer"]
    assert "deep_prompt" in detail["msg"] and detail["allowed"] == ["local"]


async def test_bbt_refused_on_a_generation_task(app_client):
    body = label_job(method="bbt", backends={"scorer": "local", "optimizer": "local"})
    body["task"] = {"dataset": "builtin:gsm8k"}
    body["params"] = {"preset": "small"}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"][-2:] == ["task", "metric"]


async def test_methods_lists_bbt_params(app_client):
    methods = {m["name"]: m for m in (await app_client.get("/v1/methods")).json()}
    for name in ("bbt", "bbtv2"):
        properties = methods[name]["parameters"]["properties"]
        wanted = {"prompt_length", "intrinsic_dim", "popsize", "budget", "sigma", "alpha", "loss", "budget2"}
        assert wanted <= set(properties)
        assert properties["intrinsic_dim"]["default"] == 500 and properties["popsize"]["default"] == 20
        assert set(methods[name]["presets"]) == {"paper", "small", "bbt_rgb"}
        assert methods[name]["description"] != name
    assert "deep_prompt" in methods["bbtv2"]["scorer_needs"]
    assert "input_embeddings" in methods["bbt"]["scorer_needs"]
