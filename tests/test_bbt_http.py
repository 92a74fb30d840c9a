"""BBT over HTTP: the openai_compat backend sends soft prompts as vLLM `prompt_embeds`.

The server here is the fake vLLM server with the real local model behind it (`tests/fakes/served_model.py`), so
what the client embeds and sends is checked against what the local runner computes for the same soft prompt.
"""

from __future__ import annotations

import base64
import io
import os

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from app.errors import InvalidPayload
from app.evaluation.task import Example, Task
from app.jobs.engine import task_from_spec
from app.llm.local import LocalBackend
from app.llm.openai_compat import OpenAICompatBackend
from app.llm.port import Capability, ContinuousPrefix, LabelScoreRequest, PrefixKind
from app.llm.registry import BackendRegistry
from app.main import create_app
from app.settings import BackendSettings
from tests.conftest import running_worker, wait_for_status
from tests.conftest import served as api_on_a_port
from tests.fakes.fake_vllm import FakeVLLMServer
from tests.fakes.served_model import SERVED_MODEL, ServedModel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def local_model():
    from app.settings import Settings

    settings = Settings()
    backend = LocalBackend("local", BackendSettings(kind="local", batch_size=8), settings.model_cache_dir)
    await backend.start()
    yield backend
    await backend.aclose()


@pytest.fixture(scope="module")
def served(local_model):
    """The fake vLLM server serving the local model (its own copy), with --enable-prompt-embeds."""
    model = LocalBackend("served", BackendSettings(kind="local"), local_model.model_dir.parent)
    responder = ServedModel(model)
    with FakeVLLMServer(responder=responder) as server:
        yield server, responder


def http_options(server: FakeVLLMServer) -> dict:
    return {"kind": "openai_compat", "base_url": server.base_url, "max_concurrency": 8}


def http_backend(server: FakeVLLMServer, **overrides) -> OpenAICompatBackend:
    return OpenAICompatBackend("served", BackendSettings(**{**http_options(server), **overrides}))


async def test_probe_finds_prompt_embeds_only_with_the_served_weights(served, tmp_path):
    server, responder = served
    async with http_backend(server, embedding_weights=str(responder.weights_dir)) as backend:
        assert Capability.INPUT_EMBEDDINGS in backend.info.capabilities
        assert backend.info.detail["prompt_embeds"] == "ok" and backend.info.geometry["hidden_size"] == 576
        assert backend.info.model_id == SERVED_MODEL

    async with http_backend(server) as backend:  # no weights: text-only
        assert Capability.INPUT_EMBEDDINGS not in backend.info.capabilities
        assert "no embedding_weights" in backend.info.detail["prompt_embeds"]

    # Weights of the right shape that are not the served model's: the probe's two answers disagree.
    wrong = tmp_path / "wrong.safetensors"
    rows = np.random.default_rng(0).normal(0, 0.05, (49152, 576)).astype(np.float32)
    save_file({"model.embed_tokens.weight": rows}, str(wrong))
    async with http_backend(server, embedding_weights=str(wrong)) as backend:
        assert Capability.INPUT_EMBEDDINGS not in backend.info.capabilities
        assert "do not look like the served model" in backend.info.detail["prompt_embeds"]

    responder.prompt_embeds = False  # vLLM started without --enable-prompt-embeds
    try:
        async with http_backend(server, embedding_weights=str(responder.weights_dir)) as backend:
            assert Capability.INPUT_EMBEDDINGS not in backend.info.capabilities
            assert "--enable-prompt-embeds" in backend.info.detail["prompt_embeds"]
    finally:
        responder.prompt_embeds = True


async def test_soft_prompt_over_http_scores_as_the_local_runner(served, local_model):
    server, responder = served
    rng = np.random.default_rng(1)
    prefixes = [ContinuousPrefix.of(PrefixKind.INPUT, rng.normal(0, 0.05, (3, 576))) for _ in range(2)]
    prompts = ["Is the sky blue? Answer:", "Text: The cat sat on the mat.\nTopic:", "A film review. Good?"]
    requests = [LabelScoreRequest(p, (" yes", " no", " animal"), prefixes[i % 2]) for i, p in enumerate(prompts)]
    requests.append(LabelScoreRequest(prompts[0], (" yes", " no", " animal")))  # and a plain one
    expected = await local_model.label_logprobs(requests)
    server.reset()
    async with http_backend(server, embedding_weights=str(responder.weights_dir)) as backend:
        got = await backend.label_logprobs(requests)
    for want, have in zip(expected, got, strict=True):
        assert have.logprobs == pytest.approx(want.logprobs, abs=2e-3)
    # The three soft-prompted prompts share one request, whose token count is split over them; the plain one
    # goes alone (text and embeddings never share a request) and gets its own count.
    assert sum(s.prompt_tokens for s in got[:3]) == sum(s.prompt_tokens for s in expected[:3])
    assert got[3].prompt_tokens == expected[3].prompt_tokens
    # What went over the wire: (prefix + prompt tokens, hidden) float32 tensors for the soft-prompted requests.
    sent = [r.body for r in server.requests("completions")]
    assert sum("prompt_embeds" in b for b in sent) == 1 and sum("prompt" in b for b in sent) == 1
    embedded = next(b for b in sent if "prompt_embeds" in b)["prompt_embeds"]
    assert isinstance(embedded, list) and len(embedded) == 3
    tensor = torch.load(io.BytesIO(base64.b64decode(embedded[0])), weights_only=True)
    assert tensor.dtype == torch.float32 and tensor.shape[1] == 576 and tensor.shape[0] > 3
    assert all(b["max_tokens"] == 1 and b["logprob_token_ids"] for b in sent)


async def test_additive_soft_prompt_over_http_scores_as_the_local_runner(served, local_model):
    """BBT's additive form: the client adds the vectors to its placeholder tokens' rows before sending."""
    server, responder = served
    instruction = "Classify the text."
    rng = np.random.default_rng(2)
    prefixes = [
        ContinuousPrefix.of(PrefixKind.INPUT_ADD, rng.normal(0, 0.05, (8, 576)), anchor=instruction),
        ContinuousPrefix.of(PrefixKind.INPUT_ADD, np.zeros((8, 576)), anchor=instruction),  # z = 0
    ]
    prompts = [
        f"{instruction}\nText: The cat sat on the mat.\nTopic:",
        f"Task. {instruction} Text: Paris is a city.\nTopic:",
        f"{instruction}\nText: A film review.\nTopic:",
    ]
    verbalizers = (" animal", " city", " film")
    requests = [LabelScoreRequest(p, verbalizers, prefix) for p in prompts for prefix in prefixes]
    expected = await local_model.label_logprobs(requests)
    plain = await local_model.label_logprobs([LabelScoreRequest(p, verbalizers) for p in prompts])
    server.reset()
    async with http_backend(server, embedding_weights=str(responder.weights_dir)) as backend:
        got = await backend.label_logprobs(requests)
    for want, have in zip(expected, got, strict=True):
        assert have.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert sum(s.prompt_tokens for s in got) == sum(s.prompt_tokens for s in expected)
    for i, reference in enumerate(plain):  # z = 0 over HTTP is the text prompt
        assert got[2 * i + 1].logprobs == pytest.approx(reference.logprobs, abs=1e-4)
        assert abs(got[2 * i].logprobs[0] - reference.logprobs[0]) > 1e-3
    sent = [r.body for r in server.requests("completions")]
    assert len(sent) == 1 and len(sent[0]["prompt_embeds"]) == 6  # one request carries all six
    tensor = torch.load(io.BytesIO(base64.b64decode(sent[0]["prompt_embeds"][0])), weights_only=True)
    assert tensor.shape == (expected[0].prompt_tokens, 576)  # the prompt's own tokens, none added


async def test_deep_prefix_is_refused_over_http(served):
    server, responder = served
    deep = ContinuousPrefix.of(PrefixKind.DEEP, np.zeros((30, 2, 3, 1, 64)))
    deep_add = ContinuousPrefix.of(PrefixKind.DEEP_ADD, np.zeros((30, 2, 576)), anchor="x")
    async with http_backend(server, embedding_weights=str(responder.weights_dir)) as backend:
        with pytest.raises(Exception, match="deep prefixes"):
            await backend.label_logprobs([LabelScoreRequest("x", (" a",), deep)])
        with pytest.raises(Exception, match="deep_add prefixes"):
            await backend.label_logprobs([LabelScoreRequest("x", (" a",), deep_add)])


@pytest.fixture
async def http_client(settings, served):
    """API + SAQ worker with backend `served`: openai_compat over the fake server with the real model. Each has its
    own registry, as separate processes would: the API's defers the prompt_embeds check, the worker's probes."""
    server, responder = served
    settings.backends["served"] = BackendSettings(
        kind="openai_compat", base_url=server.base_url, max_concurrency=8, embedding_weights=str(responder.weights_dir)
    )
    app = create_app(settings)
    async with running_worker(settings), app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


async def served_verdict(client: httpx.AsyncClient) -> str:
    backends = {b["name"]: b for b in (await client.get("/v1/backends")).json()}
    return backends["served"]["detail"]["prompt_embeds"]


async def test_bbt_job_over_http_and_predict_reproduces_dev(http_client, served):
    client = http_client
    server, _ = served
    body = {
        "method": "bbt",
        "task": {"dataset": "builtin:snli16"},
        "initial_prompt": "Always answer No.",
        "backends": {"scorer": "served", "optimizer": "served"},
        "params": {"prompt_length": 2, "intrinsic_dim": 8, "popsize": 4, "budget": 8, "eval_every": 4,
                   "train_subset": 4},
        "budget": {"max_llm_calls": 400},
        "seed": 3,
    }  # fmt: skip
    server.reset()
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed" and job["progress"]["step"] == 2
    embedded = [r for r in server.completed_requests("completions") if "prompt_embeds" in r.body]
    assert sum(r.prompts for r in embedded) >= 2 * 4 * 4  # two generations of 4 candidates on 4 examples, at least
    assert job["usage"]["llm_calls"] == server.count("completions", completed_only=True)

    candidates = (await client.get(f"/v1/jobs/{job['id']}/candidates?limit=100")).json()["items"]
    assert sum(c["prompt"].startswith("[bbt soft prompt") for c in candidates) == 8
    if job["best"]["prompt"] == job["initial"]["prompt"]:
        pytest.skip("no soft prompt beat the manual one on dev at this tiny budget")  # pragma: no cover
    artifact = (await client.get(f"/v1/jobs/{job['id']}/artifact")).json()
    assert artifact["model_id"] == SERVED_MODEL and artifact["geometry"]["hidden_size"] == 576

    spec = (await client.get(f"/v1/jobs/{job['id']}")).json()["spec"]
    dataset = (await client.get("/v1/datasets/builtin:snli16?examples_limit=1000")).json()
    dev = task_from_spec(spec["task"], dataset["examples"]).split_examples("dev")
    assert (await served_verdict(client)).startswith("not probed in the API")  # the worker ran the job
    predicted = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in dev]})
    assert predicted.status_code == 200, predicted.text
    assert await served_verdict(client) == "ok"  # checked before the API's first soft prompt
    outputs = [p["output"] for p in predicted.json()["predictions"]]
    assert sum(o == ex.target for o, ex in zip(outputs, dev, strict=True)) / len(dev) == pytest.approx(
        job["best"]["dev_score"]
    )
    # The toy text-only backend lacks input embeddings; the local runner serves another model id.
    for other, reason in (("default", "input_embeddings"), ("local", "do not transfer")):
        refused = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": ["x"], "backend": other})
        assert refused.status_code == 422 and reason in refused.text, refused.text


async def test_bbt_refused_on_http_backend_without_prompt_embeds(app_client):
    body = {
        "method": "bbt",
        "task": {"dataset": "builtin:snli16"},
        "backends": {"scorer": "default", "optimizer": "default"},
        "params": {"preset": "small"},
    }
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["loc"][-2:] == ["backends", "scorer"] and "input_embeddings" in detail["msg"]
    assert "local" in detail["allowed"]


async def test_the_api_never_opens_the_embedding_weights(settings, fake_llm, tmp_path):
    """The API process validates and queues soft-prompt jobs without reading the served model's embedding weights:
    not at start-up (its probe grants `input_embeddings` on the configuration), not for the backends list, the
    readiness check, a submission or an estimate. Workers read them; the API only for a soft-prompt `predict`."""
    from app.llm.embedding_weights import open_input_embeddings
    from bench.bench_process_memory import FileOpens
    from bench.sim_server import write_embedding_weights

    weights = tmp_path / "embed.safetensors"
    write_embedding_weights(str(weights), 64)
    settings.backends["soft"] = BackendSettings(
        kind="openai_compat", base_url=fake_llm.base_url, embedding_weights=str(weights)
    )
    opens = FileOpens(weights)
    try:
        async with api_on_a_port(settings) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
            backends = {b["name"]: b for b in (await client.get("/v1/backends")).json()}
            assert opens.count() == 0, f"the API opened {weights} at start-up"
            assert "input_embeddings" in backends["soft"]["capabilities"], backends["soft"]
            assert backends["soft"]["detail"]["prompt_embeds"].startswith("not probed in the API")
            assert "input_embeddings" not in backends["default"]["capabilities"]  # no weights configured
            assert (await client.get("/readyz")).status_code == 200
            body = {
                "method": "bbt",
                "task": {"dataset": "builtin:snli16"},
                "backends": {"scorer": "soft", "optimizer": "soft"},
                "params": {"preset": "small"},
            }
            assert (await client.post("/v1/jobs/estimate", json=body)).status_code == 200
            submitted = await client.post("/v1/jobs", json=body)
            assert submitted.status_code == 202, submitted.text
            job = (await client.get(f"/v1/jobs/{submitted.json()['id']}")).json()
            assert job["status"] == "queued"
            predicted = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": ["x"]})
            assert predicted.status_code == 422  # no prompt yet: nothing to apply
        assert opens.count() == 0, f"the API opened {weights} {opens.count()} times"
        assert open_input_embeddings(weights)[[0]].shape == (1, 64)
        assert opens.count() > 0  # and the watch does see an open
    finally:
        opens.close()


async def test_the_deferred_prompt_embeds_check_runs_before_the_first_soft_prompt(served, settings, tmp_path):
    """Where the API defers it, the check runs before the first soft prompt the API sends (a soft-prompt
    predict): the served weights pass it; weights that are not the served model's are a 422 naming why."""
    server, responder = served
    prefix = ContinuousPrefix.of(PrefixKind.INPUT, np.zeros((2, 576)))
    request = LabelScoreRequest("Is the sky blue? Answer:", (" yes", " no"), prefix)
    options = BackendSettings(**http_options(server), embedding_weights=str(responder.weights_dir))
    async with OpenAICompatBackend("served", options, defer_prompt_embeds=True) as backend:
        assert Capability.INPUT_EMBEDDINGS in backend.info.capabilities
        assert backend.info.detail["prompt_embeds"].startswith("not probed in the API")
        assert backend._embedder.matrix is None  # nothing read yet
        await backend.label_logprobs([request])
        assert backend.info.detail["prompt_embeds"] == "ok" and backend.info.geometry["hidden_size"] == 576

    from app.evaluation.evaluator import SoftPrompt
    from app.jobs.service import PredictionPrompt, predict

    wrong = tmp_path / "wrong.safetensors"
    save_file({"model.embed_tokens.weight": np.full((49152, 576), 0.01, dtype=np.float32)}, str(wrong))
    settings.backends["served"] = BackendSettings(**http_options(server), embedding_weights=str(wrong))
    registry = BackendRegistry(settings, defer_prompt_embeds=True)
    await registry.probe_all()
    try:
        assert Capability.INPUT_EMBEDDINGS in registry.capabilities("served")
        task = Task(examples=[], template="{prompt}\n{input}", metric="label_accuracy", labels=["yes", "no"])
        prompt = PredictionPrompt(SoftPrompt("soft", "Answer.", prefix), task, {"model_id": SERVED_MODEL})
        with pytest.raises(InvalidPayload, match="do not look like the served model"):
            await predict(registry, prompt, "served", ["Is the sky blue?"])
        assert Capability.INPUT_EMBEDDINGS not in registry.capabilities("served")
    finally:
        await registry.aclose()


async def test_bbt_predictions_over_http_are_the_same_with_rows_read_on_demand_and_the_whole_matrix(served):
    """Rows read from the file as prompts need them (now) against the whole matrix read into memory as float32
    (before): the same embedding std, the same tensors sent as prompt_embeds, the same scores and predictions."""
    from safetensors import safe_open

    from app.datasets.builtin import BUILTIN_TASKS
    from app.evaluation.evaluator import Evaluator
    from app.llm.metered import MeteredLLM
    from app.optimizers.bbt.projection import soft_prompt_from_artifact
    from app.usage import Budget, Usage

    server, responder = served
    weights = str(responder.weights_dir)
    with safe_open(str(responder.weights_dir / "model.safetensors"), framework="pt") as handle:
        whole = np.ascontiguousarray(handle.get_tensor("model.embed_tokens.weight").float().numpy())
    spec = BUILTIN_TASKS["snli16"]
    examples = [Example(ex["input"], ex["target"]) for ex in spec.examples()[:6]]
    task = Task(examples=examples, template=spec.template, metric=spec.metric, labels=spec.labels,
                verbalizer=spec.verbalizer)  # fmt: skip
    instruction = "Does the premise entail the hypothesis?"

    def decoded(embeds: str | list[str]) -> list[list]:  # as values, read back as vLLM reads them
        items = embeds if isinstance(embeds, list) else [embeds]
        return [torch.load(io.BytesIO(base64.b64decode(item)), weights_only=True).tolist() for item in items]

    outcomes = []
    for way in ("read", "whole"):
        async with http_backend(server, embedding_weights=weights) as backend:
            if way == "whole":
                backend._embedder.matrix = whole  # what the client held before: (vocab, hidden) float32
            std = await backend.embedding_std()
            prompts = []
            for insertion, seed in (("add", 1), ("prepend", 2)):
                z = np.random.default_rng(seed).normal(0, 1, 4).tolist()
                artifact = {"version": 2, "method": "bbt", "model_id": SERVED_MODEL, "geometry": {"hidden_size": 576},
                            "projection_seed": seed, "prompt_length": 3, "intrinsic_dim": 4, "alpha": 1.0,
                            "sigma": 1.0, "insertion": insertion, "placeholder": "instruction", "text": instruction,
                            "std": 0.02, "z": z}  # fmt: skip
                prompts.append(soft_prompt_from_artifact(artifact))
            server.reset()
            evaluator = Evaluator(task, MeteredLLM(backend, usage=Usage(), budget=Budget(), store=None))
            predictions = await evaluator.predict(prompts, examples)
            sent = [decoded(r.body["prompt_embeds"]) for r in server.requests("completions")]
            scores = await backend.label_logprobs(evaluator._label_requests(prompts, examples))
        outcomes.append((std, predictions, sent, [s.logprobs for s in scores]))
    (std_read, *read), (std_whole, *whole_matrix) = outcomes
    assert std_read == pytest.approx(std_whole, rel=1e-6)
    assert read == whole_matrix
    predictions, sent, _ = read
    assert sent and all(label in spec.labels for row in predictions for label in row)


def test_embedding_weights_are_found_in_a_file_a_directory_and_a_hub_cache_entry(tmp_path):
    from app.llm.embedding_weights import EmbeddingWeightsError, open_input_embeddings

    matrix = np.arange(12, dtype=np.float32).reshape(4, 3)
    other = np.ones((2, 2), dtype=np.float32)
    everything = list(range(4))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"lm_head.weight": other}, str(model_dir / "model-00001-of-00002.safetensors"))
    save_file({"model.embed_tokens.weight": matrix}, str(model_dir / "model-00002-of-00002.safetensors"))
    assert np.array_equal(open_input_embeddings(model_dir)[everything], matrix)  # searched across shards
    assert np.array_equal(open_input_embeddings(model_dir / "model-00002-of-00002.safetensors")[[2, 0]], matrix[[2, 0]])
    assert np.array_equal(open_input_embeddings(model_dir, "lm_head.weight")[[0, 1]], other)

    snapshot = tmp_path / "hub" / "models--Org--Name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"transformer.wte.weight": matrix}, str(snapshot / "model.safetensors"))
    assert np.array_equal(open_input_embeddings(tmp_path / "hub" / "models--Org--Name")[everything], matrix)

    with pytest.raises(EmbeddingWeightsError, match="no 'missing'"):
        open_input_embeddings(model_dir, "missing")
    with pytest.raises(EmbeddingWeightsError, match="not a .safetensors file"):
        open_input_embeddings(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_embedding_rows_are_read_in_the_files_dtype_and_widened_on_demand(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file as save_torch

    from app.llm.embedding_weights import open_input_embeddings

    weights = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    save_torch({"model.embed_tokens.weight": weights, "other": torch.zeros(3)}, str(tmp_path / "m.safetensors"))
    rows = open_input_embeddings(tmp_path / "m.safetensors")
    expected = weights.float().numpy()
    assert rows.shape == (300, 16)
    assert np.array_equal(rows[[5, 0, 299, 5]], expected[[5, 0, 299, 5]])
    assert rows[[1]].dtype == np.float32
    assert rows.std() == pytest.approx(float(expected.std()), rel=1e-6)


def test_embedding_rows_leave_the_process_holding_only_the_rows_it_copied(tmp_path):
    """Rows are read, not mapped: a mapped row makes the kernel map the pages around it too (a 2 MB folio on some
    filesystems), so scattered token ids, or BBT's std scan over the whole matrix, left most of it resident in the
    process. Read, none of the file is resident in it, whatever was gathered."""
    from app.llm.embedding_weights import open_input_embeddings
    from bench.bench_process_memory import resident_of

    path = tmp_path / "m.safetensors"
    matrix = np.random.default_rng(0).normal(0, 0.02, (8192, 512)).astype(np.float32)  # 16 MB, 2 kB a row
    save_file({"model.embed_tokens.weight": matrix}, str(path))
    rows = open_input_embeddings(path)
    assert rows.std() == pytest.approx(float(matrix.std()), rel=1e-6)
    ids = np.random.default_rng(1).integers(0, 8192, 2000)
    nested = [[3, 3], [8191, -1]]
    assert np.array_equal(rows[ids], matrix[ids]) and np.array_equal(rows[nested], matrix[nested])
    assert rows[[]].shape == (0, 512)
    assert resident_of(os.getpid(), path) == (False, 0)  # never mapped
    with pytest.raises(IndexError):
        rows[[8192]]


def test_soft_prompt_goes_after_a_bos_and_first_otherwise():
    from app.llm.port import leading_special_ids, soft_prompt_position

    assert leading_special_ids([1, 15, 16], [15, 16]) == [1]  # a tokenizer that adds a BOS
    assert leading_special_ids([15, 16], [15, 16]) == []  # SmolLM2: none
    assert leading_special_ids([1, 99], [15, 16]) == []  # not a prefix of the plain ids: nothing assumed
    assert soft_prompt_position([1, 7, 8], [1]) == 1
    assert soft_prompt_position([7, 8], [1]) == 0 and soft_prompt_position([7, 8], []) == 0
