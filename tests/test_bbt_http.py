"""BBT over HTTP: the openai_compat backend sends soft prompts as vLLM `prompt_embeds`.

The server here is the fake vLLM server with the real local model behind it (`tests/fakes/served_model.py`), so
what the client embeds and sends is checked against what the local runner computes for the same soft prompt.
"""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from app.jobs.engine import task_from_spec
from app.llm.local import LocalBackend
from app.llm.openai_compat import OpenAICompatBackend
from app.llm.port import Capability, ContinuousPrefix, LabelScoreRequest, PrefixKind
from app.llm.registry import BackendRegistry
from app.main import create_app
from app.settings import BackendSettings
from tests.conftest import running_worker, wait_for_status
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


def http_backend(server: FakeVLLMServer, **overrides) -> OpenAICompatBackend:
    options = {"kind": "openai_compat", "base_url": server.base_url, "max_concurrency": 8, **overrides}
    return OpenAICompatBackend("served", BackendSettings(**options))


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
    """API + SAQ worker with backend `served`: openai_compat over the fake server with the real model."""
    server, responder = served
    settings.backends["served"] = BackendSettings(
        kind="openai_compat", base_url=server.base_url, max_concurrency=8, embedding_weights=str(responder.weights_dir)
    )
    registry = BackendRegistry(settings)
    app = create_app(settings, registry=registry)
    async with running_worker(settings, registry), app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client
    await registry.aclose()


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
    predicted = await client.post(f"/v1/jobs/{job['id']}/predict", json={"inputs": [ex.input for ex in dev]})
    assert predicted.status_code == 200, predicted.text
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
    assert rows.shape == (300, 16) and isinstance(rows._stored, np.memmap)  # mapped, not read into memory
    assert np.array_equal(rows[[5, 0, 299, 5]], expected[[5, 0, 299, 5]])
    assert rows[[1]].dtype == np.float32
    assert rows.std() == pytest.approx(float(expected.std()), rel=1e-6)


def test_soft_prompt_goes_after_a_bos_and_first_otherwise():
    from app.llm.port import leading_special_ids, soft_prompt_position

    assert leading_special_ids([1, 15, 16], [15, 16]) == [1]  # a tokenizer that adds a BOS
    assert leading_special_ids([15, 16], [15, 16]) == []  # SmolLM2: none
    assert leading_special_ids([1, 99], [15, 16]) == []  # not a prefix of the plain ids: nothing assumed
    assert soft_prompt_position([1, 7, 8], [1]) == 1
    assert soft_prompt_position([7, 8], [1]) == 0 and soft_prompt_position([7, 8], []) == 0
