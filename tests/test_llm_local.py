"""The `local` backend against the real SmolLM2-135M-Instruct on CPU.

The first run converts the GGUF into a safetensors cache (~30 s) under $PROMPTOPT_DATA_DIR/models
(default ~/.promptopt/models); later runs load it in about a second.
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest

from app.llm.local import CAPABILITIES, LocalBackend
from app.llm.port import BackendError, Capability, FeatureRequest, GenerationRequest, LabelScoreRequest, LLMBackend
from app.settings import BackendSettings

MODEL_CACHE = Path(os.environ.get("PROMPTOPT_DATA_DIR", Path.home() / ".promptopt")) / "models"

PROMPTS = [
    "Review: the plot was thin but the acting was superb and I left the cinema smiling. Sentiment:",
    "Hi",
    "Classify the company. Apple Inc. designs smartphones. Category:",
    "Question: what is two plus two? Answer with a single word, then stop. Answer:",
    "Text: The Eiffel Tower is in Paris, the capital city of France. Topic:",
    "Sentiment of 'awful':",
]
VERBALIZERS = (" positive", " negative", " company", " Paris", "")


@pytest.fixture(scope="session")
async def backend():
    b = LocalBackend("test-local", BackendSettings(kind="local", batch_size=4), MODEL_CACHE)
    await b.start()
    yield b
    await b.aclose()


def _templated_len(backend: LocalBackend, prompt: str, system: str | None = None) -> int:
    tok = backend.tokenizer()
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False).input_ids)


async def test_capabilities_without_loading():
    b = LocalBackend("cold", BackendSettings(kind="local", batch_size=7, dtype="bfloat16"), MODEL_CACHE)
    try:
        assert isinstance(b, LLMBackend)
        info = b.info
        assert b.name == "cold" and info.name == "cold" and info.kind == "local"
        assert info.capabilities == CAPABILITIES == frozenset(Capability)
        assert info.max_concurrency == 7
        assert "SmolLM2-135M-Instruct.Q4_1.gguf" in info.model_id and "bfloat16" in info.model_id
        fp32 = LocalBackend("x", BackendSettings(kind="local"), MODEL_CACHE)
        assert fp32.info.model_id != info.model_id and "float32" in fp32.info.model_id
        await fp32.aclose()
        assert not b.started
        # Counting tokens loads the tokenizer only, never the model.
        prompt, system = "Tell me about the sea.", "Be brief."
        bound = b.count_tokens_upper_bound(prompt + system)
        assert not b.started
        assert bound >= _templated_len(b, prompt, system)
        assert b.count_tokens_upper_bound(prompt) >= _templated_len(b, prompt)
        assert b.count_tokens(prompt) == len(b.tokenizer()(prompt).input_ids)
    finally:
        await b.aclose()


async def test_label_logprobs_batched_equals_single(backend: LocalBackend):
    requests = [LabelScoreRequest(p, VERBALIZERS) for p in PROMPTS]
    seen: list[int] = []
    batched = await backend.label_logprobs(requests, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(len(requests)))  # once per request
    tok = backend.tokenizer()
    for request, scores in zip(requests, batched, strict=True):
        assert scores.prompt_tokens == len(tok(request.prompt).input_ids) > 0
        assert scores.completion_tokens == 0
        assert len(scores.logprobs) == len(VERBALIZERS)
        assert all(math.isfinite(lp) and lp <= 0 for lp in scores.logprobs[:-1])
        assert scores.logprobs[-1] == float("-inf")  # an empty verbalizer has no first token
        (single,) = await backend.label_logprobs([request])
        assert single.prompt_tokens == scores.prompt_tokens
        for a, b in zip(single.logprobs[:-1], scores.logprobs[:-1], strict=True):
            assert abs(a - b) < 1e-3
    # The obvious label at least beats an unrelated one where the prompt names it outright.
    paris = batched[4].logprobs
    assert paris[3] > paris[0]


async def test_label_logprobs_concurrent_calls(backend: LocalBackend):
    a = [LabelScoreRequest(p, (" yes", " no")) for p in PROMPTS[:3]]
    b = [LabelScoreRequest(p, (" yes", " no")) for p in PROMPTS[3:]]
    ra, rb = await asyncio.gather(backend.label_logprobs(a), backend.label_logprobs(b))
    together = await backend.label_logprobs(a + b)
    for x, y in zip(ra + rb, together, strict=True):
        assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-3


DEMONSTRATIONS = (
    "".join(
        f"Text: {company} makes {thing}.\nCategory: Company\n\n"
        for company, thing in [
            ("Acme", "anvils"),
            ("Globex", "lamps"),
            ("Initech", "printers"),
            ("Umbrella", "vaccines"),
        ]
    )
    + "Text: The Nile flows through Egypt.\nCategory: Place\n\nClassify the text.\n"
)
INPUTS = ["Paris is a city.", "Toyota builds cars.", "The Alps are mountains.", "Nokia sold phones.", "Rome."]


def record_forwards(backend: LocalBackend, monkeypatch) -> list[int]:
    """Tokens each forward pass computes (rows x width of its new tokens)."""
    computed: list[int] = []
    forward = backend._forward  # noqa: SLF001

    def counting(input_ids, *args, **kwargs):
        computed.append(int(input_ids.numel()))
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(backend, "_forward", counting)
    return computed


@pytest.mark.parametrize("attention", ["rowwise", "sdpa"])
async def test_a_shared_head_is_computed_once_and_scores_as_without_reuse(
    backend: LocalBackend, attention, monkeypatch
):
    """Prompts carrying the same demonstrations run the demonstrations once; every score stays that of the prompt
    run whole, whatever else is in the call (other heads, strangers, a prompt that is the head itself)."""
    subject = backend
    if attention != "rowwise":
        subject = LocalBackend(
            "test-sdpa", BackendSettings(kind="local", batch_size=4), MODEL_CACHE, attn_implementation=attention
        )
    try:
        prompts = [f"{DEMONSTRATIONS}Text: {text}\nCategory:" for text in INPUTS]
        prompts += [f"Pick a label.\n{DEMONSTRATIONS}Text: {text}\nCategory:" for text in INPUTS[:3]]
        prompts += [DEMONSTRATIONS, PROMPTS[0], PROMPTS[1]]
        requests = [LabelScoreRequest(p, (" Company", " Place", " City")) for p in prompts]
        computed = record_forwards(subject, monkeypatch)
        subject.prefix_reuse = False
        whole = await subject.label_logprobs(requests)
        whole_tokens, computed[:] = sum(computed), []
        subject.prefix_reuse = True
        seen: list[int] = []
        reused = await subject.label_logprobs(requests, on_result=lambda i, r: seen.append(i))
        assert sorted(seen) == list(range(len(requests)))
        for a, b in zip(whole, reused, strict=True):
            assert a.prompt_tokens == b.prompt_tokens  # usage counts every prompt token, as vLLM reports them
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
        # Two heads (the demonstrations; "Pick a label." + the demonstrations), each run once.
        head = len(subject.tokenizer()(DEMONSTRATIONS).input_ids)
        assert sum(computed) < whole_tokens - 4 * head
        alone = [(await subject.label_logprobs([r]))[0] for r in requests[:2]]
        for a, b in zip(alone, reused[:2], strict=True):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-3)
    finally:
        subject.prefix_reuse = True
        if subject is not backend:
            await subject.aclose()


async def test_generate_same_seed_same_text_alone_or_batched(backend: LocalBackend):
    sampled = GenerationRequest("Write one sentence about a lighthouse.", max_tokens=20, temperature=0.9, seed=7)
    greedy = GenerationRequest("Name a fruit.", max_tokens=16, system="Answer in a few words.")
    others = [
        GenerationRequest("Hi", max_tokens=6, temperature=0.7, seed=1),
        GenerationRequest("Explain, in detail and step by step, how a bicycle gear works. " * 3, max_tokens=12),
        GenerationRequest("Say something.", max_tokens=10, temperature=1.2, seed=3, n=2),
    ]
    (alone_sampled,) = await backend.generate([sampled])
    (alone_greedy,) = await backend.generate([greedy])
    seen: list[int] = []
    batch = await backend.generate(
        [others[0], sampled, others[1], greedy, others[2]], on_result=lambda i, r: seen.append(i)
    )
    assert sorted(seen) == list(range(5))
    assert batch[1].texts == alone_sampled.texts
    assert batch[3].texts == alone_greedy.texts
    assert batch[1].prompt_tokens == alone_sampled.prompt_tokens == _templated_len(backend, sampled.prompt)
    assert batch[3].prompt_tokens == _templated_len(backend, greedy.prompt, greedy.system)
    assert batch[1].completion_tokens == alone_sampled.completion_tokens
    for request, g in zip([others[0], sampled, others[1], greedy, others[2]], batch, strict=True):
        assert len(g.texts) == request.n
        assert 0 < g.completion_tokens <= request.max_tokens * request.n
        assert g.prompt_tokens <= backend.count_tokens_upper_bound(request.prompt + (request.system or ""))
    # Greedy is reproducible run to run; a different seed gives (almost surely) another sample.
    assert (await backend.generate([greedy]))[0].texts == alone_greedy.texts
    assert alone_greedy.texts[0].strip()


async def test_generate_n_samples_use_consecutive_seeds(backend: LocalBackend):
    request = GenerationRequest("Invent a name for a cat.", max_tokens=12, temperature=1.0, seed=100, n=3)
    (g,) = await backend.generate([request])
    assert len(g.texts) == 3
    assert g.completion_tokens > 0
    (second,) = await backend.generate(
        [GenerationRequest("Invent a name for a cat.", max_tokens=12, temperature=1.0, seed=101)]
    )
    assert second.texts[0] == g.texts[1]
    assert g.prompt_tokens == second.prompt_tokens
    # Greedy with n > 1: n identical texts, completion tokens counted for each.
    (greedy,) = await backend.generate([GenerationRequest("Invent a name for a cat.", max_tokens=8, n=2)])
    assert len(greedy.texts) == 2 and greedy.texts[0] == greedy.texts[1]
    assert greedy.completion_tokens % 2 == 0 and greedy.completion_tokens > 0


async def test_generate_stops_at_stop_string_and_max_tokens(backend: LocalBackend):
    base = GenerationRequest("Count from one to twenty in words, separated by commas.", max_tokens=24)
    (full,) = await backend.generate([base])
    text = full.texts[0]
    assert len(text) > 8
    stop = text[4:7]
    cut = text.find(stop)
    (stopped,) = await backend.generate([GenerationRequest(base.prompt, max_tokens=24, stop=("@@never@@", stop))])
    assert stopped.texts[0] == text[:cut]
    assert stopped.completion_tokens < full.completion_tokens
    (short,) = await backend.generate([GenerationRequest(base.prompt, max_tokens=3)])
    assert short.completion_tokens == 3
    assert text.startswith(short.texts[0])
    (nothing,) = await backend.generate([GenerationRequest(base.prompt, max_tokens=0)])
    assert nothing.texts == [""] and nothing.completion_tokens == 0


async def test_token_embedding_matrix(backend: LocalBackend):
    matrix = await backend.token_embedding_matrix()
    assert matrix.shape == (49152, 576)
    assert str(matrix.dtype) == "float32"


async def test_features_shape_determinism_and_batch_independence(backend: LocalBackend):
    import numpy as np
    import torch

    texts = PROMPTS[:4]
    together = await backend.features([FeatureRequest(t) for t in texts])
    assert [f.dim for f in together] == [576] * 4
    assert [f.prompt_tokens for f in together] == [backend.count_tokens(t) for t in texts]
    again = await backend.features([FeatureRequest(t) for t in reversed(texts)])
    alone = [(await backend.features([FeatureRequest(t)]))[0] for t in texts]
    for a, b, c in zip(together, reversed(again), alone, strict=True):
        assert np.array_equal(a.array(), b.array())
        assert np.allclose(a.array(), c.array(), atol=1e-5)
    mean = await backend.features([FeatureRequest(t, pooling="mean") for t in texts])
    for m, a in zip(mean, together, strict=True):  # the same for a one-token text ("Hi"), else not
        assert np.isfinite(m.array()).all() and np.allclose(m.array(), a.array()) == (a.prompt_tokens == 1)

    # "last" is the hidden state the next-token logits are read from: the LM head turns it into the label scores.
    (scores,) = await backend.label_logprobs([LabelScoreRequest(texts[0], VERBALIZERS[:3])])
    with torch.inference_mode():
        logits = backend._model.lm_head(torch.from_numpy(together[0].array()))  # noqa: SLF001
        logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = [backend.tokenizer()(v, add_special_tokens=False).input_ids[0] for v in VERBALIZERS[:3]]
    assert [float(logprobs[i]) for i in ids] == pytest.approx(scores.logprobs, abs=1e-3)
    with pytest.raises(BackendError, match="pooling"):
        await backend.features([FeatureRequest("x", pooling="max")])


def test_auto_dtype_is_bf16_only_on_a_cpu_with_native_bf16(tmp_path):
    from app.llm.local import LocalBackend, resolve_dtype
    from app.settings import BackendSettings

    native = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
    emulated = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"
    assert resolve_dtype("auto", native) == "bfloat16"
    assert resolve_dtype("auto", emulated) == "float32"
    assert resolve_dtype("float32", native) == "float32" and resolve_dtype("bfloat16", emulated) == "bfloat16"
    backend = LocalBackend("x", BackendSettings(kind="local", dtype="auto"), tmp_path)
    assert backend.info.model_id.endswith(":" + backend.dtype) and backend.dtype in ("float32", "bfloat16")
