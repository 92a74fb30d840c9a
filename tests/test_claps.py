"""ClaPS: vocabulary filtering and clustering (cached), pruning, greedy and genetic search, resume, params, API.

The scorer is a scripted backend at the LLM boundary behind a real MeteredLLM and Evaluator: its vocabulary is 20
well-separated clusters of 3 words (`k07b` is word b of cluster 7), and every word of cluster c in the prompt moves
the gold label's logit by (c - 12) x 0.15, so clusters 13-19 help (19 most) and 0-11 hurt.
"""

from __future__ import annotations

import json
import re
import uuid

import numpy as np
import pytest
from pydantic import ValidationError

from app.cache.store import DurableCacheStore
from app.evaluation.evaluator import Evaluator
from app.evaluation.task import Example, Task
from app.llm.metered import LRU, MeteredLLM
from app.llm.port import BackendInfo, Capability, LabelScores
from app.optimizers.base import OptimizerContext, derived_rng
from app.optimizers.claps import Claps, ClapsParams
from app.optimizers.claps.search import crossover, mutate, next_generation, prune, reward_and_accuracy
from app.optimizers.claps.vocab import cluster_representatives, word_start_tokens
from app.optimizers.registry import METHODS, get_method
from app.usage import Budget, Usage
from tests.conftest import label_job

LABELS = ["alpha", "beta", "gamma"]
TEMPLATE = "{prompt}\nText: {input}\nTopic:"
INITIAL = "Classify the text."
N_CLUSTERS = 20
WORD = re.compile(r"^k(\d\d)[abc]$")


def strength(cluster: int) -> float:
    return (cluster - 12) * 0.15


def clusters_of(text: str) -> list[int]:
    return [int(m.group(1)) for w in text.split() if (m := WORD.match(w))]


class FakeTokenizer:
    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def __len__(self) -> int:
        return len(self.pieces)

    def convert_ids_to_tokens(self, ids):
        return [self.pieces[i] for i in ids]

    def batch_decode(self, sequences, clean_up_tokenization_spaces=False):
        return ["".join(self.pieces[i] for i in seq).replace("\u0120", " ") for seq in sequences]


def fake_vocabulary() -> tuple[list[str], np.ndarray]:
    noise = derived_rng(1, 2)
    pieces = ["<|endoftext|>", "ing", "\u0120\u0120", "\u0120"]
    rows = [noise.normal(size=N_CLUSTERS) for _ in pieces]
    for c in range(N_CLUSTERS):
        for j in "abc":
            pieces.append(f"\u0120k{c:02d}{j}")
            rows.append(10.0 * np.eye(N_CLUSTERS)[c] + 0.1 * noise.normal(size=N_CLUSTERS))
    pieces += ["\u0120k19a"]  # a duplicate word: collapses
    rows.append(rows[-1])
    return pieces, np.asarray(rows, dtype=np.float32)


class FakeScorer:
    """A white-box-looking backend: label log-probs from the words in the prompt, plus a tokenizer and embeddings."""

    name = "fake-claps"

    def __init__(self, model_id: str = "fake-claps", embeddings: bool = True) -> None:
        capabilities = {Capability.LABEL_LOGPROBS} | ({Capability.TOKEN_EMBEDDINGS} if embeddings else set())
        self.info = BackendInfo(self.name, "test", model_id, frozenset(capabilities))
        self.pieces, self.matrix = fake_vocabulary()
        self.embedding_calls = 0
        self.scored = 0

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text.split()) + 1

    async def token_embedding_matrix(self):
        self.embedding_calls += 1
        return self.matrix.copy()

    def tokenizer(self):
        return FakeTokenizer(self.pieces)

    async def label_logprobs(self, requests, on_result=None):
        out = []
        for i, request in enumerate(requests):
            prompt, _, rest = request.prompt.partition("\nText: ")
            gold = int(re.match(r"item (\d+)", rest).group(1)) % len(LABELS)
            logits = np.array([1.0, 0.0, 0.0])
            logits[gold] += sum(strength(c) for c in clusters_of(prompt))
            logprobs = logits - np.log(np.exp(logits).sum())
            scores = LabelScores([float(v) for v in logprobs], prompt_tokens=len(request.prompt.split()))
            self.scored += 1
            if on_result is not None:
                on_result(i, scores)
            out.append(scores)
        return out


def make_task(n: int = 24) -> Task:
    examples = [Example(f"item {i}", LABELS[i % len(LABELS)]) for i in range(n)]
    return Task(examples=examples, template=TEMPLATE, metric="label_accuracy", labels=list(LABELS))


def make_ctx(backend: FakeScorer | None = None, store=None, lru: LRU | None = None, task: Task | None = None):
    backend = backend or FakeScorer()
    llm = MeteredLLM(backend, usage=Usage(), budget=Budget(), store=store, lru=lru or LRU(100_000))
    ctx = OptimizerContext(evaluator=Evaluator(task or make_task(), llm), optimizer_llm=llm, initial_prompt=INITIAL)
    return ctx, backend


def make_params(**overrides) -> ClapsParams:
    base = {
        "n_clusters": N_CLUSTERS,
        "percentile": 90.0,
        "prune_chunk": 8,
        "prompt_length": 2,
        "population_size": 8,
        "n_epochs": 3,
        "mutate_frac": 0.25,
        "n_mutants": 4,
        "n_crossovers": 4,
        "mutation_prob": 0.3,
    }
    return ClapsParams(**{**base, **overrides})


async def run_until(claps: Claps, ctx: OptimizerContext, steps: int | None = None) -> list:
    reports = []
    while not claps.done and (steps is None or claps.steps_done < steps):
        reports.append(await claps.step(ctx))
    return reports


# ---------------------------------------------------------------------------------------------------------
# Vocabulary and clustering


def test_word_start_tokens_filter() -> None:
    pieces = [
        "<s>",
        "\u0120great",
        "ly",
        "\u0120\u0120",
        "\u2581news",
        "\u0120great",
        "\u0120a b",
        "\u0120\u00e2",
        "\u0120",
    ]
    texts = ["<s>", " great", "ly", "  ", "news", " great", " a b", " \ufffd", " "]
    words, ids = word_start_tokens(pieces, texts)
    assert words == [" great", " news"] and ids == [1, 4]


def test_cluster_representatives_one_per_cluster() -> None:
    pieces, matrix = fake_vocabulary()
    words, ids = word_start_tokens(pieces, [p.replace("\u0120", " ") for p in pieces])
    assert len(words) == 3 * N_CLUSTERS  # the duplicate and the non-words are gone
    reps = cluster_representatives(words, matrix[ids], N_CLUSTERS, 0)
    assert len(reps) == N_CLUSTERS == len(set(reps))
    assert sorted(clusters_of(" ".join(reps))) == list(range(N_CLUSTERS))
    assert cluster_representatives(words, matrix[ids], N_CLUSTERS, 0) == reps  # seeded
    assert len(cluster_representatives(words[:5], matrix[ids][:5], N_CLUSTERS, 0)) <= 5  # k capped by the words


async def test_clustering_distinct_words_and_cached(db) -> None:
    model_id = f"fake-claps-{uuid.uuid4().hex[:8]}"
    backend = FakeScorer(model_id)
    ctx, _ = make_ctx(backend, store=DurableCacheStore(db))
    first = Claps(make_params(), 0)
    reports = await run_until(first, ctx, 2)
    assert backend.embedding_calls == 1
    reps = first.representatives
    assert len(reps) == N_CLUSTERS == len(set(reps))
    assert all(w.startswith(" ") and WORD.match(w.strip()) for w in reps)
    assert first.vocabulary == {"source": "token_embeddings", "size": 3 * N_CLUSTERS}
    assert [c.prompt for c in reports[1].candidates] == [""] and "clustered 60 words" in reports[1].message

    # Another job on the same model and settings (new process: empty LRU) reads it from the durable cache.
    other = FakeScorer(model_id)
    ctx2, _ = make_ctx(other, store=DurableCacheStore(db))
    second = Claps(make_params(), 5)
    await run_until(second, ctx2, 2)
    assert other.embedding_calls == 0 and second.representatives == reps
    # Other settings cluster again.
    third = Claps(make_params(n_clusters=10, prune_chunk=10), 0)
    await run_until(third, ctx2, 2)
    assert other.embedding_calls == 1 and len(third.representatives) == 10


async def test_sentence_embedding_fallback(monkeypatch) -> None:
    from app.llm import sentence_embeddings

    vectors = sentence_embeddings.embed(["cat", "kitten", "finance"])
    assert vectors.shape == (3, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    words = sentence_embeddings.vocabulary_words()
    assert len(words) > 10_000 and all(w.isalpha() and not w.startswith("##") for w in words)

    few = ["cat", "kitten", "dog", "puppy", "bank", "finance", "money", "red", "blue", "green", "river", "lake"]
    monkeypatch.setattr(sentence_embeddings, "vocabulary_words", lambda: few)
    ctx, backend = make_ctx(FakeScorer(embeddings=False))
    claps = Claps(make_params(n_clusters=4, prune_chunk=4), 0)
    await run_until(claps, ctx, 2)
    assert claps.vocabulary == {"source": "sentence_embeddings", "size": len(few)}
    reps = claps.representatives
    assert len(reps) == 4 == len(set(reps)) and {w.strip() for w in reps} <= set(few)
    assert backend.embedding_calls == 0


# ---------------------------------------------------------------------------------------------------------
# Pruning


def test_prune_function() -> None:
    scores = [float(i) for i in range(20)]
    assert prune(scores, 90.0, 1) == [19, 18]
    assert prune(scores, 50.0, 1) == list(range(19, 9, -1))
    assert prune([0.0] * 10, 90.0, 3) == [0, 1, 2]  # all tied: none above the percentile, keep min_pruned
    assert prune([], 90.0, 1) == []


@pytest.mark.parametrize(("percentile", "kept"), [(90.0, 2), (50.0, 10)])
async def test_pruning_keeps_the_right_share(percentile: float, kept: int) -> None:
    ctx, _ = make_ctx()
    claps = Claps(make_params(percentile=percentile), 0)
    reports = await run_until(claps, ctx, 2 + claps.prune_steps)
    assert claps.prune_steps == 3  # 20 representatives in chunks of 8
    assert len(claps.pruned) == kept
    # the most helpful clusters, most influential first
    assert clusters_of(" ".join(claps.pruned)) == list(range(19, 19 - kept, -1))
    scored = [c for r in reports[2:] for c in r.candidates]
    assert len(scored) == N_CLUSTERS and all(c.details["phase"] == "prune" for c in scored)
    for c in scored:
        (cluster,) = clusters_of(c.prompt)
        assert c.details["influence"] == pytest.approx(
            claps.scored[c.prompt].objective - claps.empty["reward"], abs=1e-6
        )
        assert (c.details["influence"] > 0) == (strength(cluster) > 0)


async def test_kl_pruning_keeps_the_most_influential_either_way() -> None:
    ctx, _ = make_ctx()
    claps = Claps(make_params(prune_type="kl"), 0)
    await run_until(claps, ctx, 2 + claps.prune_steps)
    assert len(claps.pruned) == 2 and all(v >= 0 for v in claps.influence)
    assert clusters_of(" ".join(claps.pruned)) == [0, 1]  # the strongest (harmful) shifts


async def test_pruning_pads_to_a_fixed_step_count() -> None:
    # n_clusters 100 asks for 4 chunks of 25, but only 60 words exist: the last pruning step has nothing to do.
    ctx, _ = make_ctx()
    claps = Claps(make_params(n_clusters=100, prune_chunk=25), 0)
    assert claps.total_steps == 1 + 4 + 2
    reports = await run_until(claps, ctx)
    assert len(claps.representatives) == 3 * N_CLUSTERS
    assert [len(r.candidates) for r in reports[2:6]] == [25, 25, 10, 0]
    assert claps.pruned is not None and len(reports) == claps.total_steps + 1 and claps.done


# ---------------------------------------------------------------------------------------------------------
# Search


def test_reward_and_accuracy() -> None:
    logprobs = [[-0.1, -3.0], [-2.0, -0.2], [-1.0, -1.0]]
    reward, accuracy = reward_and_accuracy(logprobs, [0, 0, 1])
    assert accuracy == pytest.approx(1 / 3)  # the tie goes to the first label
    p = np.exp(np.asarray(logprobs))
    p = p / p.sum(axis=1, keepdims=True)
    assert reward == pytest.approx(np.mean(np.log([p[0, 0], p[1, 0], p[2, 1]])))


def test_crossover_and_mutation() -> None:
    rng = derived_rng(3, 4)
    a, b = [0] * 32, [1] * 32
    child = crossover(a, b, rng)
    assert 0 < sum(child) < 32  # tokens from both parents, position by position
    left = [10 + i for i in range(8)]
    right = [20 + i for i in range(8)]
    mixed = crossover(left, right, rng)
    assert all(t in (left[i], right[i]) for i, t in enumerate(mixed))
    assert mutate(a, 5, 0.0, rng) == a
    assert all(0 <= t < 5 for t in mutate(a, 5, 1.0, rng)) and mutate([9] * 20, 5, 1.0, rng) != [9] * 20
    population = next_generation([a, b], 5, 3, 4, 0.1, rng)
    assert len(population) == 2 + 3 + 4 and population[:2] == [a, b]


async def test_accuracy_agrees_with_the_evaluator() -> None:
    ctx, _ = make_ctx()
    claps = Claps(make_params(), 0)
    await run_until(claps, ctx, 2 + claps.prune_steps)
    examples = claps.scoring_examples(ctx)
    texts = [INITIAL, ""] + [w.strip() for w in claps.representatives[:6]]
    scores = await ctx.evaluator.score(texts, examples=examples)
    for text, scored in zip(texts, scores, strict=True):
        assert claps.scored[text].score == pytest.approx(scored.score)


@pytest.mark.parametrize("search", ["greedy", "genetic"])
async def test_search_beats_the_empty_prompt(search: str) -> None:
    ctx, _ = make_ctx()
    claps = Claps(make_params(search=search, percentile=50.0, prompt_length=3), 0)
    reports = await run_until(claps, ctx)
    assert claps.done and len(reports) == claps.total_steps + 1
    empty_reward, empty_accuracy = claps.empty["reward"], claps.empty["accuracy"]
    best = claps.best()
    assert best.details["reward"] > empty_reward and best.score > empty_accuracy
    assert len(best.prompt.split()) == 3 and all(c >= 13 for c in clusters_of(best.prompt))
    assert len(claps.history) == claps.search_steps
    # step 0: the manual prompt alone (the job's baseline); the empty prompt is a reference, never selectable
    assert [c.prompt for c in reports[0].candidates] == [INITIAL] and reports[0].leader == 0
    assert [(c.prompt, c.score, c.eligible) for c in reports[1].candidates] == [("", empty_accuracy, False)]
    for report in reports[2 : 2 + claps.prune_steps]:
        assert report.leader is None and not any(c.eligible for c in report.candidates)
    for report in reports[2 + claps.prune_steps + (search == "greedy") :]:
        # every search step offers its best string for selection (greedy's first pick is a pruning word: not)
        assert report.candidates and report.leader is not None
        for c in report.candidates:
            assert c.details["phase"] == search and c.eligible and 0.0 <= c.score <= 1.0
            assert len(c.prompt.split()) == (3 if search == "genetic" else len(c.prompt.split()))
        leader = report.candidates[report.leader]
        assert leader.score == max(c.score for c in report.candidates)
        assert claps.history[report.step - 2 - claps.prune_steps]["prompt"] in [c.prompt for c in report.candidates]
    texts = [c.prompt for r in reports for c in r.candidates if "first_scored_at" not in c.details]
    assert len(texts) == len(set(texts))  # never scored twice


async def test_greedy_first_position_reuses_the_pruning_scores() -> None:
    ctx, backend = make_ctx()
    claps = Claps(make_params(), 0)
    await run_until(claps, ctx, 2 + claps.prune_steps)
    before = backend.scored
    report = await claps.step(ctx)
    # nothing sent again, and the pruning word it chose is not offered for selection
    assert backend.scored == before and report.candidates == [] and report.leader is None
    assert clusters_of(claps.history[-1]["prompt"]) == [19]


@pytest.mark.parametrize(("search", "cut"), [("greedy", 1), ("greedy", 4), ("genetic", 5), ("genetic", 7)])
async def test_resume_equals_uninterrupted(search: str, cut: int) -> None:
    params = make_params(search=search, percentile=50.0)
    ctx, _ = make_ctx()
    whole = Claps(params, 9)
    expected = await run_until(whole, ctx)

    first = Claps(params, 9)
    head = await run_until(first, ctx, cut)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = Claps(params, 9)
    resumed.load_state_dict(state)
    tail = await run_until(resumed, ctx)
    assert head + tail == expected
    assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(RuntimeError):
        await resumed.step(ctx)


async def test_empty_manual_prompt_is_listed_once() -> None:
    ctx, _ = make_ctx()
    ctx.initial_prompt = ""
    claps = Claps(make_params(), 0)
    reports = await run_until(claps, ctx, 2)
    assert [c.prompt for c in reports[0].candidates] == [""] and reports[1].candidates == []


async def test_non_label_task_fails_in_step_zero() -> None:
    task = Task(examples=make_task().examples, template=TEMPLATE, metric="exact_match")
    ctx, _ = make_ctx(task=task)
    with pytest.raises(ValueError, match="label_accuracy"):
        await Claps(make_params(), 0).step(ctx)


# ---------------------------------------------------------------------------------------------------------
# Params, presets, registry, API


def test_params_defaults_presets_registry() -> None:
    p = ClapsParams()
    assert (p.search, p.n_clusters, p.percentile, p.prune_type, p.prompt_length) == ("greedy", 2000, 90.0, "reward", 5)
    assert (p.population_size, p.n_epochs, p.mutate_frac, p.mutation_prob) == (128, 30, 0.1, 0.1)
    assert (p.n_mutants, p.n_crossovers, p.kmeans_seed, p.train_subset) == (64, 64, 0, None)
    for bad in ({"search": "pso"}, {"percentile": 100.0}, {"prompt_length": 0}, {"prune_type": "x"}, {"x": 1}):
        with pytest.raises(ValidationError):
            ClapsParams(**bad)
    for name, preset in Claps.presets.items():
        assert ClapsParams(**preset), name
    assert ClapsParams(**Claps.presets["paper"]) == ClapsParams()
    assert Claps(ClapsParams(), 0).total_steps == 1 + 32 + 5
    assert Claps(ClapsParams(search="genetic"), 0).total_steps == 1 + 32 + 30
    assert Claps.scorer_needs == frozenset({Capability.LABEL_LOGPROBS}) and Claps.optimizer_needs == frozenset()
    assert METHODS["claps"] is Claps and get_method("claps") is Claps
    assert Claps.check_task({"metric": "exact_match", "labels": None})
    assert Claps.check_task({"metric": "label_accuracy", "labels": ["a", "b"]}) == []


async def test_claps_in_methods_and_task_check(app_client, fake_llm) -> None:
    methods = {m["name"]: m for m in (await app_client.get("/v1/methods")).json()}
    claps = methods["claps"]
    assert claps["scorer_needs"] == ["label_logprobs"] and claps["optimizer_needs"] == []
    props = claps["parameters"]["properties"]
    assert props["n_clusters"]["default"] == 2000 and props["percentile"]["default"] == 90.0
    assert props["search"]["default"] == "greedy" and "description" in props["prompt_length"]
    assert set(claps["presets"]) == {"paper", "small"}

    body = label_job(method="claps", task={"dataset": "builtin:gsm8k"})
    body["params"] = {"preset": "small"}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert "label_accuracy" in response.text
