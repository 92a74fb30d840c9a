"""The OpenAI-compatible backend against the fake vLLM server (real HTTP over loopback)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.responses import JSONResponse

from app.llm.inflight import InFlightLimit, QueueFeedback, parse_vllm_queue
from app.llm.openai_compat import PROBE_HEADER, BackendHTTPError, OpenAICompatBackend, parse_retry_after
from app.llm.openai_compat.responses import split_total
from app.llm.port import (
    SEND_GATE,
    BackendError,
    Capability,
    CapabilityMissing,
    ContinuousPrefix,
    Generation,
    GenerationRequest,
    LabelScoreRequest,
    LabelScores,
    LLMBackend,
    PrefixKind,
    SendRefused,
)
from app.settings import BackendSettings
from tests.fakes import FakeVLLMServer, free_port

VERBALIZERS = (" positive", " negative", " neutral", " maybe so")
PROMPTS = [f"Review: {text}\nSentiment:" for text in ("great film", "dull plot", "it was fine", "loved it", "meh")]


def settings_for(url: str, **overrides) -> BackendSettings:
    values = dict(kind="openai_compat", base_url=url, timeout_s=5.0, max_retries=3, retry_base_delay_s=0.01)
    values.update(overrides)
    return BackendSettings(**values)


@pytest.fixture
def fake():
    with FakeVLLMServer() as server:
        yield server


@pytest.fixture
def fake_strict():
    """An older vLLM: no `logprob_token_ids` (a 400 when sent)."""
    with FakeVLLMServer(supports_logprob_token_ids=False) as server:
        yield server


async def started(fake: FakeVLLMServer, **overrides) -> OpenAICompatBackend:
    backend = OpenAICompatBackend("test", settings_for(fake.base_url, **overrides))
    await backend.start()
    return backend


# ---------------------------------------------------------------------- probe


async def test_probe_with_logprob_token_ids(fake):
    backend = OpenAICompatBackend("test", settings_for(fake.base_url))
    assert isinstance(backend, LLMBackend)
    # Before the probe: conservative.
    assert backend.info.capabilities == frozenset({Capability.GENERATE})
    assert backend.info.kind == "openai_compat" and backend.info.max_concurrency == 256
    await backend.start()
    await backend.start()  # idempotent
    info = backend.info
    assert info.model_id == "fake-model"
    assert info.capabilities == frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS})
    assert info.detail["label_mode"] == "token_ids" and info.detail["tokenize"] is True
    assert info.detail["max_model_len"] == 8192
    # Probes are flagged, so they do not count as LLM calls.
    assert fake.count() == 0
    probes = fake.requests(("models", "completions", "tokenize"), include_probes=True)
    # model list, log-probs, tokenize, logprob_token_ids, a prompt list
    assert [r.kind for r in probes] == ["models", "completions", "tokenize", "completions", "completions"]
    assert info.detail["prompts_per_request"] == 16
    assert all(r.probe for r in probes)
    assert all("prompt_logprobs" not in r.body for r in probes)
    await backend.aclose()


@pytest.mark.parametrize("ignore_unknown_fields", [False, True], ids=["rejects", "ignores"])
async def test_probe_without_logprob_token_ids(ignore_unknown_fields):
    with FakeVLLMServer(supports_logprob_token_ids=False, ignore_unknown_fields=ignore_unknown_fields) as fake:
        backend = await started(fake)
        info = backend.info
        assert info.capabilities == frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS})
        assert info.detail["label_mode"] == "top_k"
        assert info.detail["max_logprobs"] == 20
        await backend.aclose()


async def test_probe_finds_a_lower_max_logprobs():
    with FakeVLLMServer(supports_logprob_token_ids=False, max_logprobs=7) as fake:
        backend = await started(fake)
        assert backend.info.detail["label_mode"] == "top_k"
        assert backend.info.detail["max_logprobs"] == 7
        await backend.aclose()


async def test_probe_picks_the_configured_model_or_fails(fake):
    backend = await started(fake, model="fake-model")
    assert backend.info.model_id == "fake-model"
    await backend.aclose()
    backend = OpenAICompatBackend("test", settings_for(fake.base_url, model="other-model"))
    with pytest.raises(BackendError, match="not served"):
        await backend.start()
    await backend.aclose()


async def test_a_server_without_a_model_list_needs_a_configured_model(fake):
    fake.responder = lambda kind, body: error_response(404, "Not Found") if kind == "models" else None
    backend = await started(fake, model="fake-model")
    assert backend.info.model_id == "fake-model"
    assert Capability.LABEL_LOGPROBS in backend.info.capabilities
    await backend.aclose()
    backend = OpenAICompatBackend("test", settings_for(fake.base_url))
    with pytest.raises(BackendHTTPError, match="Not Found"):
        await backend.start()
    await backend.aclose()


async def test_no_probe_takes_the_settings_as_given(fake):
    settings = settings_for(fake.base_url, probe=False, model="fake-model", capabilities=["generate", "deep_prompt"])
    backend = OpenAICompatBackend("test", settings)
    # deep_prompt can never be offered over HTTP.
    assert backend.info.capabilities == frozenset({Capability.GENERATE})
    assert backend.info.model_id == "fake-model"
    await backend.start()
    assert fake.count(("models", "chat", "completions", "tokenize"), include_probes=True) == 0
    with pytest.raises(CapabilityMissing):
        await backend.label_logprobs([LabelScoreRequest("x", (" a",))])
    await backend.aclose()

    default = OpenAICompatBackend("d", settings_for(fake.base_url, probe=False, model="fake-model"))
    assert default.info.capabilities == frozenset({Capability.GENERATE, Capability.LABEL_LOGPROBS})
    await default.aclose()
    with pytest.raises(ValueError, match="unknown capability"):
        OpenAICompatBackend("bad", settings_for(fake.base_url, capabilities=["telepathy"]))


async def test_continuous_prompts_are_not_offered_over_http(fake):
    # Sending prompt_embeds is not built: declaring input_embeddings is ignored (so BBT jobs get a 422 at
    # submission), and a request with a prefix is refused rather than scored without it.
    backend = await started(fake, capabilities=["generate", "input_embeddings"])
    assert Capability.INPUT_EMBEDDINGS not in backend.info.capabilities
    assert Capability.LABEL_LOGPROBS in backend.info.capabilities  # probed, not taken from the list
    prefix = ContinuousPrefix.of(PrefixKind.INPUT, np.zeros((2, 4)))
    with pytest.raises(CapabilityMissing):
        await backend.label_logprobs([LabelScoreRequest("x", (" a",), prefix)])
    await backend.aclose()


def test_probe_header_is_what_the_fake_reads():
    from tests.fakes import fake_vllm

    assert fake_vllm.PROBE_HEADER == PROBE_HEADER


# ---------------------------------------------------------------------- generate


async def test_generate_returns_in_order_and_reports_each_once(fake):
    # Later requests answer sooner, so completion order is the reverse of request order.
    async def responder(kind, body):
        if kind == "chat":
            index = int(body["messages"][-1]["content"].split()[-1])
            await asyncio.sleep(0.02 * (6 - index))
        return None

    fake.responder = responder
    backend = await started(fake, max_concurrency=8)
    requests = [GenerationRequest(f"question {i}", max_tokens=64, temperature=0.0) for i in range(6)]
    seen: list[tuple[int, Generation]] = []
    results = await backend.generate(requests, on_result=lambda i, g: seen.append((i, g)))

    assert sorted(i for i, _ in seen) == list(range(6))
    assert [i for i, _ in seen] != list(range(6))  # really answered out of order
    assert all(results[i] is g for i, g in seen)
    for request, result in zip(requests, results, strict=True):
        rendered = fake.toy.render_chat([{"role": "user", "content": request.prompt}])
        assert result.texts == [fake.toy.chat_text(rendered, temperature=0.0, seed=None, index=0)]
        assert result.prompt_tokens > 0 and result.completion_tokens > 0
    assert fake.count("chat") == 6 and fake.count("chat", completed_only=True) == 6
    await backend.aclose()


async def test_generate_sends_the_request_fields(fake):
    backend = await started(fake, max_concurrency=1)
    requests = [
        GenerationRequest("p0", max_tokens=7, temperature=0.7, n=2, seed=3, stop=("\n", "END"), system="be brief"),
        GenerationRequest("p1"),
    ]
    await backend.generate(requests)
    first, second = (r.body for r in fake.requests("chat"))
    assert first == {
        "model": "fake-model",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "p0"}],
        "max_tokens": 7,
        "temperature": 0.7,
        "n": 2,
        "seed": 3,
        "stop": ["\n", "END"],
    }
    assert second == {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "p1"}],
        "max_tokens": 256,
        "temperature": 0.0,
        "n": 1,
    }
    await backend.aclose()


async def test_requests_go_out_in_request_order(fake):
    backend = await started(fake, max_concurrency=2)
    fake.latency_s = 0.01
    requests = [GenerationRequest(f"q{i}") for i in range(10)]
    await backend.generate(requests)
    assert [r.body["messages"][-1]["content"] for r in fake.requests("chat")] == [f"q{i}" for i in range(10)]
    await backend.aclose()


async def test_concurrency_never_exceeds_the_limit(fake):
    backend = await started(fake, max_concurrency=3)
    fake.latency_s = 0.05
    batch = [GenerationRequest(f"q{i}") for i in range(9)]
    # Two batches at once (two jobs in one worker) share the backend's one semaphore.
    await asyncio.gather(backend.generate(batch), backend.generate(batch))
    assert fake.max_in_flight == 3
    assert fake.count("chat", completed_only=True) == 18
    await backend.aclose()


async def test_seeded_sampling_is_repeatable(fake):
    backend = await started(fake)
    seeded = GenerationRequest("write a poem", temperature=0.9, seed=42, n=3)
    first, second = await backend.generate([seeded, seeded])
    assert first.texts == second.texts and len(first.texts) == 3
    assert len(set(first.texts)) > 1  # the n samples differ from one another
    (other,) = await backend.generate([GenerationRequest("write a poem", temperature=0.9, seed=43, n=3)])
    assert other.texts != first.texts
    await backend.aclose()


async def test_missing_usage_is_estimated(fake):
    fake.responder = lambda kind, body: (
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": "abcdefgh"}}]} if kind == "chat" else None
    )
    backend = await started(fake)
    (result,) = await backend.generate([GenerationRequest("x" * 40)])
    assert result == Generation(texts=["abcdefgh"], prompt_tokens=10, completion_tokens=2)
    await backend.aclose()


# ---------------------------------------------------------------------- retries and errors


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_retries_then_succeeds_and_is_counted_once(fake, status):
    backend = await started(fake)
    fake.fail_next(2, status)
    seen = []
    (result,) = await backend.generate([GenerationRequest("hello")], on_result=lambda i, g: seen.append(i))
    assert result.texts and seen == [0]
    logged = fake.requests("chat")
    assert [r.status for r in logged] == [status, status, 200]
    assert fake.count("chat", completed_only=True) == 1
    await backend.aclose()


async def test_429_retry_after_is_honoured(fake):
    backend = await started(fake, retry_base_delay_s=0.0)
    fake.fail_next(1, 429, retry_after=0.3)
    began = time.monotonic()
    await backend.generate([GenerationRequest("hello")])
    assert time.monotonic() - began >= 0.3
    assert fake.count("chat", completed_only=True) == 1
    await backend.aclose()


async def test_retries_run_out(fake):
    backend = await started(fake, max_retries=2)
    fake.fail_next(10, 503)
    with pytest.raises(BackendHTTPError, match="after 3 attempt") as caught:
        await backend.generate([GenerationRequest("hello")])
    assert caught.value.status == 503
    assert fake.count("chat") == 3 and fake.count("chat", completed_only=True) == 0
    await backend.aclose()


async def test_400_fails_at_once_with_the_server_message(fake):
    backend = await started(fake)
    fake.responder = lambda kind, body: (
        error_response(400, "max_tokens is too large: 99999") if kind == "chat" else None
    )
    with pytest.raises(BackendHTTPError, match="max_tokens is too large") as caught:
        await backend.generate([GenerationRequest("hello", max_tokens=99999)])
    assert caught.value.status == 400 and isinstance(caught.value, BackendError)
    assert fake.count("chat") == 1
    await backend.aclose()


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "BadRequestError", "code": status}}, status_code=status)


async def test_one_failure_fails_the_batch_but_keeps_the_answers_given(fake):
    backend = await started(fake, max_concurrency=1)
    fake.responder = lambda kind, body: (
        error_response(400, "bad prompt") if kind == "chat" and body["messages"][-1]["content"] == "q2" else None
    )
    seen = []
    with pytest.raises(BackendHTTPError, match="bad prompt"):
        await backend.generate([GenerationRequest(f"q{i}") for i in range(5)], on_result=lambda i, g: seen.append(i))
    assert seen == [0, 1]
    assert fake.count("chat") == 3  # the rest were never sent
    await backend.aclose()


async def test_timeout_is_retried(fake):
    backend = await started(fake, timeout_s=0.3)
    fake.delay_next(1, 1.0)
    (result,) = await backend.generate([GenerationRequest("slow")])
    assert result.texts
    assert fake.count("chat") == 2
    await backend.aclose()


async def test_connection_refused_is_retried():
    """The server comes up only after the first attempt was refused: the retry reaches it."""
    server = FakeVLLMServer(port=free_port())
    backend = OpenAICompatBackend("test", settings_for(server.base_url, model="fake-model", retry_base_delay_s=0.2))

    async def start_after_a_refusal() -> None:
        while backend._transport.failed_attempts == 0:  # noqa: SLF001, ASYNC110
            await asyncio.sleep(0.005)
        await asyncio.to_thread(server.start)

    starter = asyncio.create_task(start_after_a_refusal())
    try:
        (result,) = await backend.generate([GenerationRequest("hello")])  # starts (probes) lazily
        assert result.texts
        assert backend._transport.failed_attempts >= 1  # noqa: SLF001
        assert server.count("chat", completed_only=True) == 1
    finally:
        starter.cancel()
        await backend.aclose()
        server.stop()


async def test_connection_refused_until_retries_run_out():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAICompatBackend("test", settings_for(url, probe=False, model="m", max_retries=2))
    began = time.monotonic()
    with pytest.raises(BackendError, match="after 3 attempt.*Cannot connect"):
        await backend.generate([GenerationRequest("hello")])
    assert time.monotonic() - began < 2.0
    await backend.aclose()


async def test_start_fails_cleanly_and_can_be_retried():
    server = FakeVLLMServer(port=free_port())
    backend = OpenAICompatBackend("test", settings_for(server.base_url, max_retries=1))
    with pytest.raises(BackendError):
        await backend.start()
    assert backend.info.capabilities == frozenset({Capability.GENERATE})
    with server:
        await backend.start()
        assert Capability.LABEL_LOGPROBS in backend.info.capabilities
    await backend.aclose()


# ---------------------------------------------------------------------- label log-probs


async def test_label_scores_by_token_ids(fake):
    backend = await started(fake)
    assert backend.info.detail["label_mode"] == "token_ids"
    requests = [LabelScoreRequest(prompt, VERBALIZERS) for prompt in PROMPTS]
    seen = []
    scores = await backend.label_logprobs(requests, on_result=lambda i, s: seen.append(i))
    assert sorted(seen) == list(range(len(PROMPTS)))
    for prompt, score in zip(PROMPTS, scores, strict=True):
        assert isinstance(score, LabelScores)
        assert score.logprobs == pytest.approx(fake.expected_label_logprobs(prompt, VERBALIZERS))
        assert score.completion_tokens == 1
    # One request carried every prompt; its usage is split over them and adds up to the server's count.
    assert sum(s.prompt_tokens for s in scores) == sum(
        len(fake.toy.encode(prompt, add_special_tokens=True)) for prompt in PROMPTS
    )
    # Every read is one position with the named ids; never prompt_logprobs.
    bodies = [r.body for r in fake.requests("completions")]
    assert len(bodies) == 1 and bodies[0]["prompt"] == PROMPTS and fake.count("completions") == len(PROMPTS)
    for body in bodies:
        assert body["max_tokens"] == 1 and body["temperature"] == 0 and "prompt_logprobs" not in body
        assert len(body["logprob_token_ids"]) == len(VERBALIZERS)
    # The verbalizers' token ids are looked up once, then cached.
    assert fake.count("tokenize") == len(VERBALIZERS)
    await backend.label_logprobs(requests[:2])
    assert fake.count("tokenize") == len(VERBALIZERS)
    # Some prompts put a different label on top: something to optimise.
    assert len({max(range(4), key=s.logprobs.__getitem__) for s in scores}) > 1
    await backend.aclose()


async def test_label_scores_by_top_k_strings(fake_strict):
    fake = fake_strict
    backend = await started(fake)
    assert backend.info.detail["label_mode"] == "top_k"
    requests = [LabelScoreRequest(prompt, VERBALIZERS) for prompt in PROMPTS]
    scores = await backend.label_logprobs(requests)
    for prompt, score in zip(PROMPTS, scores, strict=True):
        expected = fake.expected_label_logprobs(prompt, VERBALIZERS, top_k=20)
        assert score.logprobs == pytest.approx(expected)
        # " maybe" is outside the toy model's candidates: never in a top-k.
        assert score.logprobs[3] == -math.inf
        assert any(math.isfinite(v) for v in score.logprobs)
    assert all(r.body["logprobs"] == 20 and "logprob_token_ids" not in r.body for r in fake.requests("completions"))
    await backend.aclose()


async def test_top_k_without_a_tokenizer_endpoint():
    with FakeVLLMServer(supports_logprob_token_ids=False, supports_tokenize=False, max_logprobs=10) as fake:
        backend = await started(fake)
        assert backend.info.detail["tokenize"] is False and backend.info.detail["max_logprobs"] == 10
        verbalizers = (" positive", " negative", ":")
        scores = await backend.label_logprobs([LabelScoreRequest(p, verbalizers) for p in PROMPTS])
        for prompt, score in zip(PROMPTS, scores, strict=True):
            assert score.logprobs == pytest.approx(fake.expected_label_logprobs(prompt, verbalizers, top_k=10))
        assert fake.count("tokenize") == 0
        await backend.aclose()


async def test_both_paths_agree_where_the_top_k_sees_the_token(fake, fake_strict):
    by_ids, by_top_k = await started(fake), await started(fake_strict)
    requests = [LabelScoreRequest(prompt, VERBALIZERS) for prompt in PROMPTS]
    for a, b in zip(await by_ids.label_logprobs(requests), await by_top_k.label_logprobs(requests), strict=True):
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert y == -math.inf or x == pytest.approx(y)
    await by_ids.aclose()
    await by_top_k.aclose()


async def test_scripted_label_logprobs(fake):
    fake.responder = lambda kind, body: (
        {"token_logprobs": {" positive": -0.1, " negative": -2.5}} if kind == "completions" else None
    )
    backend = await started(fake)
    (score,) = await backend.label_logprobs([LabelScoreRequest("anything", (" positive", " negative"))])
    assert score.logprobs == pytest.approx([-0.1, -2.5])
    await backend.aclose()


# ---------------------------------------------------------------------- misc


def test_retry_after_parsing():
    assert parse_retry_after("2") == 2.0 and parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_count_tokens_upper_bound():
    backend = OpenAICompatBackend("t", settings_for("http://127.0.0.1:9/v1"))
    assert backend.count_tokens_upper_bound("") == 16
    assert backend.count_tokens_upper_bound("héllo") == 6 + 16
    assert backend.root_url == "http://127.0.0.1:9"


# ---------------------------------------------------------------------- the fake itself


async def test_fake_gate_holds_requests_without_completing_them(fake):
    backend = await started(fake, max_concurrency=8)
    fake.hold_after(2)
    task = asyncio.create_task(backend.generate([GenerationRequest(f"q{i}") for i in range(5)]))
    await fake.wait_held(3)
    assert fake.held_count() == 3
    assert fake.count("chat") == 5 and fake.count("chat", completed_only=True) == 2
    assert not task.done()
    fake.release()
    results = await task
    assert len(results) == 5 and fake.held_count() == 0
    assert fake.count("chat", completed_only=True) == 5
    await backend.aclose()


async def test_fake_does_not_complete_a_held_request_whose_client_left(fake):
    backend = await started(fake, max_retries=0)
    fake.hold_after(0)
    task = asyncio.create_task(backend.generate([GenerationRequest("q")]))
    await fake.wait_held(1)
    task.cancel()
    await backend.aclose()
    await asyncio.sleep(0.1)
    fake.release()
    for _ in range(200):
        (entry,) = fake.requests("chat")
        if entry.status is not None:
            break
        await asyncio.sleep(0.01)
    assert entry.held and entry.status == 499 and not entry.completed


async def test_fake_stop_answers_held_requests_503(fake):
    backend = await started(fake, max_retries=0)
    fake.hold_after(0)
    task = asyncio.create_task(backend.generate([GenerationRequest("q")]))
    await fake.wait_held(1)
    await asyncio.to_thread(fake.stop)
    with pytest.raises(BackendError):
        await task
    assert fake.count("chat") == 1 and fake.count("chat", completed_only=True) == 0
    await backend.aclose()


def test_fake_reset_and_probe_filter(fake):
    with httpx.Client() as client:
        client.get(f"{fake.base_url}/models", headers={PROBE_HEADER: "1"})
        client.post(f"{fake.base_url}/completions", json={"prompt": "x", "max_tokens": 1, "logprobs": 1})
    assert fake.count() == 1 and fake.count("models") == 0
    assert fake.count(("models", "completions"), include_probes=True) == 2
    fake.latency_s, fake.responder = 0.5, lambda kind, body: None
    fake.fail_next(3)
    fake.reset()
    assert fake.count(("models", "completions"), include_probes=True) == 0
    assert fake.latency_s == 0.0 and fake.responder is None and fake.max_in_flight == 0
    with httpx.Client() as client:
        answer = client.post(f"{fake.base_url}/completions", json={"prompt": "x", "max_tokens": 1})
        assert answer.status_code == 200


def test_fake_runs_as_a_process():
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.fake_vllm", "--port", "0", "--no-logprob-token-ids"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("FAKE_VLLM_URL=")
        base_url = line.split("=", 1)[1]
        with httpx.Client(timeout=5) as client:
            assert client.get(f"{base_url}/models").json()["data"][0]["id"] == "fake-model"
            answer = client.post(
                f"{base_url}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            ).json()
            assert answer["choices"][0]["message"]["content"]
            root = base_url.removesuffix("/v1")
            assert client.get(f"{root}/_fake/state").json()["completed"]["chat"] == 1
    finally:
        process.terminate()
        process.wait(10)


# ---------------------------------------------------------------------- batching, in-flight limit, send gate


async def test_label_requests_are_batched_in_order(fake):
    backend = await started(fake, prompts_per_request=4)
    prompts = [f"Review: film {i}\nSentiment:" for i in range(10)]
    seen: list[int] = []
    scores = await backend.label_logprobs(
        [LabelScoreRequest(p, VERBALIZERS) for p in prompts], on_result=lambda i, s: seen.append(i)
    )
    bodies = [r.body["prompt"] for r in fake.requests("completions")]
    assert bodies == [prompts[0:4], prompts[4:8], prompts[8:10]]
    assert sorted(seen) == list(range(10)) and fake.count("completions") == 10
    for prompt, score in zip(prompts, scores, strict=True):
        assert score.logprobs == pytest.approx(fake.expected_label_logprobs(prompt, VERBALIZERS))
    await backend.aclose()


async def test_a_server_without_prompt_lists_gets_one_prompt_a_request():
    with FakeVLLMServer(supports_prompt_lists=False) as fake:
        backend = await started(fake)
        assert backend.info.detail["prompts_per_request"] == 1
        prompts = [f"Review: film {i}\nSentiment:" for i in range(5)]
        scores = await backend.label_logprobs([LabelScoreRequest(p, VERBALIZERS) for p in prompts])
        assert [r.body["prompt"] for r in fake.requests("completions")] == prompts
        assert scores[3].logprobs == pytest.approx(fake.expected_label_logprobs(prompts[3], VERBALIZERS))
        await backend.aclose()


async def test_the_limit_counts_prompts_not_requests(fake):
    backend = await started(fake, max_concurrency=8, prompts_per_request=4)
    fake.latency_s = 0.05
    await backend.label_logprobs([LabelScoreRequest(f"p{i}", VERBALIZERS) for i in range(40)])
    assert fake.max_in_flight == 2  # two requests of 4 prompts each
    await backend.aclose()


async def test_a_closed_send_gate_stops_requests_before_they_leave(fake):
    """The job's gate is checked as each request is written: once it refuses, nothing more reaches the server."""
    backend = await started(fake, max_concurrency=1)
    allowed = 3

    def gate() -> None:
        nonlocal allowed
        if allowed == 0:
            raise SendRefused("lease not known valid")
        allowed -= 1

    token = SEND_GATE.set(gate)
    try:
        with pytest.raises(SendRefused):
            await backend.generate([GenerationRequest(f"q{i}") for i in range(6)])
    finally:
        SEND_GATE.reset(token)
    assert fake.count("chat") == 3
    await backend.aclose()


async def test_the_limit_follows_the_server_queue(fake):
    """vLLM reports many requests waiting: the limit shrinks; then none waiting while we use it all: it grows."""
    backend = await started(fake, max_concurrency=64, prompts_per_request=1)
    fake.latency_s = 0.3
    fake.queue_gauges = (64, 500)
    batch = [LabelScoreRequest(f"p{i}", VERBALIZERS) for i in range(300)]
    await backend.label_logprobs(batch)
    shrunk = backend.concurrency_limit
    assert fake.metrics_reads >= 1 and shrunk < 64
    fake.queue_gauges = (shrunk, 0)
    await backend.label_logprobs([LabelScoreRequest(f"q{i}", VERBALIZERS) for i in range(300)])
    assert backend.concurrency_limit > shrunk
    await backend.aclose()


async def test_without_queue_metrics_the_limit_stays(fake):
    backend = await started(fake, max_concurrency=16, prompts_per_request=1)
    fake.latency_s = 0.05
    await backend.label_logprobs([LabelScoreRequest(f"p{i}", VERBALIZERS) for i in range(40)])
    await asyncio.sleep(0.1)
    assert backend.concurrency_limit == 16 and fake.max_in_flight == 16
    await backend.aclose()


def test_usage_split_adds_up():
    assert split_total(10, [1, 1, 1]) == [4, 3, 3] or sorted(split_total(10, [1, 1, 1])) == [3, 3, 4]
    assert sum(split_total(97, [5, 50, 3, 0])) == 97
    assert split_total(0, [2, 3]) == [0, 0] and split_total(5, []) == []


async def test_in_flight_limit_is_weighted_fifo_and_resizable():
    limit = InFlightLimit(4)
    order: list[str] = []

    async def take(name: str, weight: int, hold: float) -> None:
        taken = await limit.acquire(weight)
        order.append(name)
        await asyncio.sleep(hold)
        limit.release(taken)

    tasks = [
        asyncio.create_task(take("a3", 3, 0.05)),
        asyncio.create_task(take("b2", 2, 0.01)),  # does not fit beside a3: waits
        asyncio.create_task(take("c1", 1, 0.01)),  # would fit, but must not overtake b2
        asyncio.create_task(take("d9", 9, 0.01)),  # cut to the limit, never waits forever
    ]
    await asyncio.gather(*tasks)
    assert order == ["a3", "b2", "c1", "d9"] and limit.in_flight == 0
    limit.set_limit(1)
    first = await limit.acquire(1)
    waiter = asyncio.create_task(limit.acquire(1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    limit.set_limit(2)  # growing lets it in
    await asyncio.wait_for(waiter, 1)
    limit.release(first)
    limit.release(waiter.result())
    cancelled = asyncio.create_task(limit.acquire(5))  # 5 -> cut to 2, fits
    await cancelled
    blocked = asyncio.create_task(limit.acquire(1))
    await asyncio.sleep(0.01)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    limit.release(cancelled.result())
    assert limit.in_flight == 0 and limit.waiting == 0


def test_queue_feedback_and_parsing():
    page = (
        "# HELP vllm:num_requests_running x\n"
        'vllm:num_requests_running{model_name="m"} 250.0\n'
        'vllm:num_requests_waiting{model_name="m"} 120.0\n'
        'vllm:num_requests_waiting_by_reason{reason="x"} 5.0\n'
    )
    assert parse_vllm_queue(page) == (250.0, 125.0)
    assert parse_vllm_queue("promptopt_x 1\n") is None
    feedback = QueueFeedback(256, floor=8)
    assert feedback.update(250, 200) == 256  # a batch or so waiting: the next steps' work, keep it
    assert feedback.update(250, 900) < 256  # a long queue at the server: back off
    low = feedback.limit
    assert feedback.update(250, 100) > low  # the queue drained: grow
    for _ in range(100):
        feedback.update(250, 0)
    assert feedback.limit == 256  # never above the ceiling (this worker's share)
    feedback.set_ceiling(100)
    assert feedback.limit == 100
