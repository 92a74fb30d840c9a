"""CrossTune: the head on its own (features given directly), the switch, the artifact, the method in the job engine
against an in-process toy backend, the `features` capability over HTTP against the fake server, and a whole job
through the API and a worker on it."""

from __future__ import annotations

import json
import random
import re

import httpx
import numpy as np
import pytest

from app.evaluation.evaluator import Evaluator
from app.evaluation.splits import SplitSpec
from app.evaluation.task import Example, Task
from app.jobs.engine import JobEngine, JobPlan
from app.llm.metered import MeteredLLM
from app.llm.openai_compat import OpenAICompatBackend
from app.llm.port import BackendInfo, Capability, FeatureRequest, Features, Generation, LabelScores
from app.main import create_app
from app.optimizers.crosstune import CrossTune, CrossTuneParams, HeadPredictor
from app.optimizers.crosstune.augment import clean_description, clean_generated, switch_by_centroid, switch_by_head
from app.optimizers.crosstune.head import Head, HeadSettings, train_head
from app.settings import BackendSettings
from app.usage import Budget, Usage
from tests.conftest import make_settings, running_worker, wait_for_status
from tests.fakes.fake_vllm import EMBEDDING_DIM, FakeVLLMServer, ToyModel
from tests.test_engine import ListSink

LABELS = ["sport", "food", "music"]
FAST = HeadSettings(hidden=16, heads=2, max_epochs=60, patience=15)


# ---------------------------------------------------------------------------------------------------------------
# The head on given features


def blobs(n_per_class: int, seed: int, dim: int = 12, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated Gaussian blobs (class c around 3 * e_c), with a large constant offset on one dimension
    as LM hidden states have."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(3):
        center = np.zeros(dim)
        center[c] = 3.0
        xs.append(center + spread * rng.standard_normal((n_per_class, dim)))
        ys += [c] * n_per_class
    x = np.concatenate(xs).astype(np.float32)
    x[:, -1] += 100.0
    return x, np.array(ys)


def label_features(dim: int = 12) -> np.ndarray:
    e = np.zeros((3, dim), dtype=np.float32)
    for c in range(3):
        e[c, c] = 3.0
    e[:, -1] = 100.0
    return e


def test_the_head_learns_a_separable_task():
    train_x, train_y = blobs(6, seed=0)
    dev_x, dev_y = blobs(4, seed=1)
    test_x, test_y = blobs(30, seed=2)
    head, report = train_head(LABELS, label_features(), train_x, train_y, dev_x, dev_y, FAST, seed=0)
    assert report.train_accuracy == 1.0 and report.dev_accuracy == 1.0
    assert 1 <= report.best_epoch <= report.epochs <= FAST.max_epochs
    predicted = head.predict(test_x)
    assert sum(p == LABELS[y] for p, y in zip(predicted, test_y, strict=True)) / len(test_y) >= 0.9
    probs = head.probabilities(test_x)
    assert probs.shape == (90, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_the_head_is_deterministic_per_seed():
    train_x, train_y = blobs(6, seed=0, spread=1.5)  # overlapping: the draws matter
    dev_x, dev_y = blobs(4, seed=1, spread=1.5)
    runs = [train_head(LABELS, label_features(), train_x, train_y, dev_x, dev_y, FAST, seed=s) for s in (7, 7, 8)]
    (a, ra), (b, rb), (c, _) = runs
    assert a.digest() == b.digest() and ra.as_dict() == rb.as_dict()
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert a.digest() != c.digest()


def test_without_dev_the_last_epoch_is_kept():
    train_x, train_y = blobs(4, seed=0)
    head, report = train_head(LABELS, label_features(), train_x, train_y, None, None, FAST, seed=0)
    assert report.epochs == report.best_epoch == FAST.max_epochs and report.dev_accuracy is None
    assert report.train_accuracy == 1.0


def test_the_head_round_trips_through_json():
    train_x, train_y = blobs(6, seed=0)
    head, _ = train_head(LABELS, label_features(), train_x, train_y, None, None, FAST, seed=0)
    again = Head.from_json(json.loads(json.dumps(head.to_json())))
    test_x, _ = blobs(10, seed=3)
    assert np.array_equal(again.probabilities(test_x), head.probabilities(test_x))
    assert again.digest() == head.digest() and again.labels == LABELS
    broken = head.to_json()
    broken["hidden"] = 8
    with pytest.raises(ValueError, match="shape"):
        Head.from_json(broken)
    with pytest.raises(ValueError, match="features per input"):
        head.probabilities(np.zeros((2, 5)))


def test_the_switch_excludes_a_mislabeled_generated_example():
    train_x, train_y = blobs(6, seed=0)
    head, _ = train_head(LABELS, label_features(), train_x, train_y, None, None, FAST, seed=0)
    written, _ = blobs(1, seed=5)  # one of each class
    intended = [0, 1, 0]  # the third reads like "music" but claims to be "sport"
    kept, confidence = switch_by_head(head, written, intended, threshold=0.5)
    assert kept == [True, True, False] and confidence[2] < 0.5 < confidence[0]
    kept, _ = switch_by_centroid(train_x, train_y, written, intended, 3)
    assert kept == [True, True, False]
    assert switch_by_head(head, written[:0], [], 0.5) == ([], [])


def test_generated_text_is_cleaned():
    assert clean_generated('Text: "Great match today."\nLabel: sport') == "Great match today."
    assert clean_generated("New text 2: the soup was cold\n\nAnother one") == "the soup was cold"
    assert clean_generated("   ") == ""
    echo = 'The task: Name the topic. Possible labels: "sport", "food"'
    assert clean_generated(echo) == "" and clean_description(echo, "sport") == "sport"
    assert clean_description('"Texts about games."\n\nMore.', "sport") == "Texts about games."


# ---------------------------------------------------------------------------------------------------------------
# The method in the job engine, against a toy backend


WORDS = {
    "sport": ["goal", "match", "team", "score", "coach", "league"],
    "food": ["soup", "bread", "spicy", "dinner", "recipe", "cheese"],
    "music": ["guitar", "song", "album", "concert", "melody", "drums"],
}
FILLER = ["the", "was", "really", "quite", "today", "we", "saw", "it", "very", "new"]


def toy_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]
        words = rng.sample(WORDS[label], 3) + rng.sample(FILLER, 3)
        rng.shuffle(words)
        out.append(Example(" ".join(words), label))
    return out


def toy_task(n: int = 48) -> Task:
    split = SplitSpec(train=0.5, dev=0.25, test=0.25, seed=0)
    return Task(toy_examples(n, 0), "{prompt}\nText: {input}\nTopic:", "label_accuracy", labels=LABELS, split=split)


class ToyBackend:
    """Label scores that always favour "sport"; bag-of-words features (the fake server's); scripted generations:
    a description per label, and for augmentation two right examples per label and, for "sport", one that is
    plainly about food."""

    name = "toy"

    def __init__(self) -> None:
        caps = {Capability.LABEL_LOGPROBS, Capability.GENERATE, Capability.FEATURES}
        self.info = BackendInfo(self.name, "test", "toy-1", frozenset(caps))
        self.toy = ToyModel()
        self.feature_texts: list[str] = []

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.split()) + 1

    async def label_logprobs(self, requests, on_result=None):
        out = [LabelScores([0.0] + [-3.0] * (len(r.verbalizers) - 1), prompt_tokens=5) for r in requests]
        for i, answer in enumerate(out):
            if on_result is not None:
                on_result(i, answer)
        return out

    async def features(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            self.feature_texts.append(request.text)
            out.append(Features.of(self.toy.embedding(request.text), prompt_tokens=len(request.text.split())))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    async def generate(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            label = re.search(r'(?:label is|labelled) "(\w+)"', request.prompt).group(1)
            if request.n > 1 or "new text" in request.prompt:
                texts = [f"Text: {' '.join(WORDS[label][k : k + 4])} tonight" for k in (0, 2)]
                if label == "sport":
                    texts.append("Text: soup bread spicy dinner recipe cheese")  # mislabeled on purpose
                texts = texts[: request.n] if request.n < len(texts) else texts
            else:
                texts = [f"Texts about {label}, e.g. {', '.join(WORDS[label][:3])}."]
            out.append(Generation(texts=texts, prompt_tokens=10, completion_tokens=10))
            if on_result is not None:
                on_result(i, out[-1])
        return out


def crosstune_plan(task: Task, seed: int = 0, **params) -> JobPlan:
    return JobPlan(
        method=CrossTune,
        params=CrossTuneParams(hidden_size=16, heads=2, max_epochs=80, patience=20, **params),
        seed=seed,
        task=task,
        initial_prompt="Name the topic.",
        scorer_backend="toy",
        optimizer_backend="toy",
    )


async def run_job(plan: JobPlan) -> tuple[JobEngine, ListSink, ToyBackend]:
    backend, sink = ToyBackend(), ListSink()
    engine = JobEngine(plan, sink, scorer=backend, optimizer_llm=backend, usage=Usage())
    outcome = await engine.run()
    assert outcome.stop_reason == "completed"
    return engine, sink, backend


async def test_a_crosstune_job_beats_the_manual_prompt_and_predict_reproduces_its_test_predictions():
    task = toy_task()
    engine, sink, backend = await run_job(crosstune_plan(task, augment_per_label=3, augment_shots=2))
    initial, best = engine.selection.initial, engine.selection.best
    test = task.split_examples("test")
    sport_share = sum(ex.target == "sport" for ex in test) / len(test)
    # The manual prompt is scored as usual (it always says "sport"); the head is the best.
    assert initial.prompt == "Name the topic." and initial.test_score == pytest.approx(sport_share)
    assert best.prompt.startswith("[crosstune head") and best.step == 1
    assert best.test_score >= 0.8 and best.test_gain["difference"] > 0
    assert best.artifact["method"] == "crosstune" and best.artifact["model_id"] == "toy-1"
    assert set(best.artifact["descriptions"]) == set(LABELS)

    (step1,) = [r for r in sink.steps if r.step == 1]
    assert [c.details["origin"] for c in step1.candidates] == ["head", "augmented"]
    generated = engine.optimizer.state_dict()["method"]["generated"]
    assert len(generated) == 7  # 2 per label, and the mislabeled "sport" one
    (wrong,) = [g for g in generated if g["label"] == "sport" and "soup" in g["input"]]
    assert wrong["kept"] is False
    assert sum(g["kept"] for g in generated) == 6 and step1.candidates[1].details["generated"] == 6

    # Features were rendered with the template and the manual prompt, descriptions in the input's place.
    assert "Name the topic.\nText: sport: Texts about sport, e.g. goal, match, team.\nTopic:" in backend.feature_texts
    # The dev selection and the test scoring found the dev features in the cache.
    assert engine.usage.cache_hits >= len(task.split_examples("dev"))

    # The stored artifact, rebuilt as `predict` rebuilds it, gives the test predictions the engine scored.
    predictor = CrossTune.prompt_from_artifact(json.loads(json.dumps(best.artifact)))
    assert isinstance(predictor, HeadPredictor) and predictor.description == best.prompt
    llm = MeteredLLM(ToyBackend(), usage=Usage(), budget=Budget(), store=None)
    (outputs,) = await Evaluator(task, llm).predict([predictor], test)
    assert outputs == sink.tests[0][best.prompt].predictions
    assert sink.tests[0]["Name the topic."].predictions == ["sport"] * len(test)


async def test_a_crosstune_job_is_deterministic_per_seed():
    task = toy_task(36)
    (a, _, _), (b, _, _), (c, _, _) = [await run_job(crosstune_plan(task, seed=s)) for s in (1, 1, 2)]
    assert a.selection.best.prompt == b.selection.best.prompt
    assert a.selection.best.artifact == b.selection.best.artifact
    assert a.selection.best.prompt != c.selection.best.prompt


async def test_given_descriptions_are_used_and_the_rest_written():
    task = toy_task(36)
    engine, _, backend = await run_job(crosstune_plan(task, label_descriptions={"food": "Meals and cooking."}))
    descriptions = engine.selection.best.artifact["descriptions"]
    assert descriptions["food"] == "Meals and cooking." and descriptions["sport"].startswith("Texts about sport")
    assert len(engine.optimizer.state_dict()["method"]["heads"]) == 1  # no augmentation: one head


def test_expected_calls_and_presets():
    params = CrossTuneParams()
    # step 0 (12 + 6), 2 descriptions, then features of 12 + 6 inputs and 2 descriptions
    assert CrossTune.expected_calls(params, 12, 6) == 18 + 2 + 20
    paper = CrossTuneParams(**CrossTune.presets["paper"])
    assert CrossTune.expected_calls(paper, 12, 6) == 18 + 2 + (2 + 16) + 20
    assert CrossTune.check_params(CrossTuneParams(hidden_size=30, heads=4)) == [
        (["heads"], "heads (4) must divide hidden_size (30)")
    ]


# ---------------------------------------------------------------------------------------------------------------
# `features` over HTTP


@pytest.fixture(scope="module")
def embeddings_server():
    with FakeVLLMServer(supports_embeddings=True) as server:
        yield server


async def test_features_over_http_are_probed_cached_and_charged(embeddings_server, fake_llm):
    server = embeddings_server
    server.reset()
    settings = BackendSettings(kind="openai_compat", base_url=server.base_url, prompts_per_request=2)
    async with OpenAICompatBackend("embeds", settings) as backend:
        assert Capability.FEATURES in backend.info.capabilities
        assert backend.info.detail["embeddings"] == f"ok: {EMBEDDING_DIM} dimensions"
        usage = Usage()
        llm = MeteredLLM(backend, usage=usage, budget=Budget(), store=None)
        texts = ["a goal in the match", "spicy soup", "a new album", "a goal in the match"]
        answers = await llm.features([FeatureRequest(t) for t in texts])
        vectors = [a.array() for a in answers]
        assert all(v.shape == (EMBEDDING_DIM,) for v in vectors)
        assert np.allclose(vectors[0], server.toy.embedding(texts[0]), atol=1e-6)
        assert np.array_equal(vectors[0], vectors[3])
        sent = server.requests("embeddings")
        assert [len(r.body["input"]) for r in sent] == [2, 1]  # the repeat is sent once, two texts a request
        assert usage.llm_calls == 3 and usage.cache_hits == 1 and usage.prompt_tokens > 0
        again = await llm.features([FeatureRequest(texts[1])])
        assert np.array_equal(again[0].array(), vectors[1]) and len(server.requests("embeddings")) == 2

    # A server without /v1/embeddings probes as off, and the metered call refuses before sending anything.
    async with OpenAICompatBackend("plain", BackendSettings(kind="openai_compat", base_url=fake_llm.base_url)) as plain:
        assert Capability.FEATURES not in plain.info.capabilities
        assert plain.info.detail["embeddings"].startswith("off: the server refused /v1/embeddings (404")
        with pytest.raises(Exception, match="features"):
            await MeteredLLM(plain, usage=Usage(), budget=Budget(), store=None).features([FeatureRequest("x")])


# ---------------------------------------------------------------------------------------------------------------
# Through the API and a worker


@pytest.fixture
async def embeds_client(database_url, fake_llm, embeddings_server):
    """API + SAQ worker with backend "embeds": the fake server with /v1/embeddings."""
    settings = make_settings(database_url, fake_llm.base_url)
    settings.backends["embeds"] = BackendSettings(
        kind="openai_compat", base_url=embeddings_server.base_url, max_concurrency=8
    )
    app = create_app(settings)
    async with running_worker(settings), app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


async def test_a_crosstune_job_over_http_and_predict_reproduces_test(embeds_client, embeddings_server):
    client = embeds_client
    examples = [{"input": ex.input, "target": ex.target} for ex in toy_examples(48, 1)]
    created = await client.post("/v1/datasets", json={"name": "topics", "examples": examples})
    assert created.status_code == 201, created.text
    dataset = created.json()["id"]
    body = {
        "method": "crosstune",
        "task": {"dataset": dataset, "template": "{prompt}\nText: {input}\nTopic:", "metric": "label_accuracy",
                 "labels": LABELS},
        "initial_prompt": "Name the topic.",
        "backends": {"scorer": "embeds", "optimizer": "embeds"},
        "params": {"preset": "small", "label_descriptions": {"music": "Songs, bands and instruments."}},
        "budget": {"max_llm_calls": 400},
        "seed": 1,
    }  # fmt: skip
    methods = {m["name"]: m for m in (await client.get("/v1/methods")).json()}
    assert set(methods["crosstune"]["presets"]) == {"paper", "small"}
    assert methods["crosstune"]["scorer_needs"] == ["features"]

    # Refusals: a scorer without features, a description of a label the task lacks.
    refused = await client.post("/v1/jobs", json={**body, "backends": {"scorer": "default", "optimizer": "default"}})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["error"]["details"][0]
    assert detail["loc"][-2:] == ["backends", "scorer"] and "'features'" in detail["msg"] and "embeds" in detail["msg"]
    wrong = {**body, "params": {"label_descriptions": {"jazz": "x"}}}
    refused = await client.post("/v1/jobs", json=wrong)
    assert refused.status_code == 422 and "jazz" in refused.text, refused.text

    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, wait_s=120)
    assert job["status"] == "succeeded" and job["stop_reason"] == "completed", job
    assert job["initial"]["prompt"] == "Name the topic." and job["best"]["prompt"].startswith("[crosstune head")
    assert job["best"]["test_score"] > job["initial"]["test_score"]

    artifact = (await client.get(f"/v1/jobs/{job['id']}/artifact")).json()
    assert artifact["method"] == "crosstune" and artifact["model_id"] == embeddings_server.model
    assert artifact["descriptions"]["music"] == "Songs, bands and instruments."
    assert artifact["head"]["labels"] == LABELS and artifact["head"]["dim"] == EMBEDDING_DIM

    spec = (await client.get(f"/v1/jobs/{job['id']}")).json()["spec"]
    from app.jobs.engine import task_from_spec

    test = task_from_spec(spec["task"], examples).split_examples("test")
    predicted = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in test]})
    assert predicted.status_code == 200, predicted.text
    outputs = [p["output"] for p in predicted.json()["predictions"]]
    accuracy = sum(o == ex.target for o, ex in zip(outputs, test, strict=True)) / len(test)
    assert accuracy == pytest.approx(job["best"]["test_score"])
    # The toy text-only backend has no features; the local runner has, but its features are another model's.
    for other, reason in (("default", "'features'"), ("local", "do not transfer")):
        refused = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": ["x"], "backend": other})
        assert refused.status_code == 422 and reason in refused.text, refused.text
