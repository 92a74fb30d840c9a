"""Plum: edits, the six searches, objective, state round trip, params, and one job through the HTTP API."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from app.evaluation.evaluator import PromptScore
from app.evaluation.task import Example, Task
from app.llm.port import Capability
from app.optimizers.base import derived_rng
from app.optimizers.plum import Plum, PlumParams, balanced_accuracy, entropy, objective
from app.optimizers.plum.edits import (
    Cand,
    Draft,
    Editor,
    apply_op,
    chunk,
    clean_paraphrase,
    feasible_ops,
    join,
)
from app.optimizers.plum.searches import ALGORITHMS, make_search
from app.optimizers.registry import METHODS, get_method
from tests.conftest import label_job, wait_for_status

# ---------------------------------------------------------------------------------------------------------
# Helpers


def scripted_paraphraser(mapping=None, calls=None):
    """Paraphrase 'bad N' -> 'good N'; anything else per `mapping`, else unchanged."""

    async def paraphrase(requests):
        if calls is not None:
            calls.append(list(requests))
        out = []
        for phrase, _seed in requests:
            if mapping and phrase in mapping:
                out.append(mapping[phrase])
            else:
                out.append(phrase.replace("bad", "good"))
        return out

    return paraphrase


def synthetic_value(cand: Cand) -> float:
    """Known optimum: every phrase 'good', none 'bad'."""
    words = cand.text.lower().split()
    return float(sum(w.startswith("good") for w in words) - sum(w.startswith("bad") for w in words))


START = "alpha one, bad two, bad three, beta four, bad five."


def small_cfg(algorithm: str, **overrides) -> PlumParams:
    base = {
        "algorithm": algorithm,
        "num_iterations": 6,
        "num_candidates": 4,
        "patience": 10,
        "population_size": 4,
        "num_offspring": 2,
        "hs_memory": 4,
        "tournament_size": 2,
    }
    return PlumParams(**{**base, **overrides})


async def drive(search, iterations: int) -> None:
    for _ in range(iterations):
        if search.stopped:
            return
        while True:
            cands = await search.ask()
            if search.tell([synthetic_value(c) for c in cands]):
                break


def new_search(algorithm: str, seed: int = 3, **overrides):
    cfg = small_cfg(algorithm, **overrides)
    editor = Editor(seed, scripted_paraphraser(), cfg.edits, cfg.num_compose, cfg.max_retries)
    search = make_search(algorithm, cfg, seed, editor)
    initial = Cand.from_text(START)
    search.start(initial, synthetic_value(initial))
    return search


# ---------------------------------------------------------------------------------------------------------
# Chunker and edit ops


def test_chunker_and_join() -> None:
    text = "Classify the sentiment of the review as positive or negative, and answer with one word."
    phrases = chunk(text)
    assert phrases == [
        "Classify the sentiment",
        "of the review",
        "as positive",
        "or negative,",
        "and answer",
        "with one word.",
    ]
    assert join(phrases) == text
    assert chunk("  ") == [] and chunk("Hello") == ["Hello"]
    assert chunk("Decide whether to answer.") == ["Decide", "whether to answer."]


def test_delete_swap_add_ops() -> None:
    rng = derived_rng(1, 2)
    draft = Draft(Cand(["a b", "c d", "e f"]))
    apply_op(draft, "delete", rng, 0)
    assert len(draft.cand.phrases) == 2 and len(draft.cand.deleted) == 1
    removed = draft.cand.deleted[0]
    assert removed not in draft.cand.phrases
    apply_op(draft, "add", rng, 0)
    assert sorted(draft.cand.phrases) == ["a b", "c d", "e f"] and draft.cand.deleted == []

    draft = Draft(Cand(["x", "y"]))
    apply_op(draft, "swap", rng, 0)
    assert draft.cand.phrases == ["y", "x"]
    assert feasible_ops(Cand(["only"]), ["delete", "swap", "paraphrase", "add"]) == ["paraphrase"]
    assert feasible_ops(Cand(["a", "b"], ["z"]), ["add", "swap"]) == ["add", "swap"]


async def test_paraphrase_batched_and_seeded() -> None:
    calls: list = []
    editor = Editor(5, scripted_paraphraser(calls=calls), ops=["paraphrase"])
    parents = [Cand(["bad one", "bad two"])] * 3
    out = await editor.mutate(parents, [(0, i) for i in range(3)])
    assert len(out) == 3 and len(calls) == 1 and len(calls[0]) == 3  # one batch for all children
    for child, ops in out:
        assert ops == ["paraphrase"] and sum(p.startswith("good") for p in child.phrases) == 1
    seeds = [seed for _, seed in calls[0]]
    assert len(set(seeds)) == 3
    calls2: list = []
    again = await Editor(5, scripted_paraphraser(calls=calls2), ops=["paraphrase"]).mutate(
        parents, [(0, i) for i in range(3)]
    )
    assert calls2 == calls and [c.text for c, _ in again] == [c.text for c, _ in out]


async def test_add_restores_deleted_phrase() -> None:
    editor = Editor(9, scripted_paraphraser(), ops=["delete"])
    (child, ops), *_ = await editor.mutate([Cand(["first part", "second part"])], [(1,)])
    assert ops == ["delete"] and len(child.deleted) == 1
    gone = child.deleted[0]
    adder = Editor(9, scripted_paraphraser(), ops=["add"])
    (restored, ops), *_ = await adder.mutate([child], [(2,)])
    assert ops == ["add"] and gone in restored.phrases and restored.deleted == []
    # add needs a non-empty tracker: with nothing deleted no edit is possible, the child is dropped
    assert await adder.mutate([Cand(["a", "b"])], [(3,)]) == []


async def test_non_alphabetic_results_are_regenerated() -> None:
    calls: list = []
    answers = iter(["123 !!", "", "a fine phrase"])

    async def paraphrase(requests):
        calls.append(requests)
        return [next(answers) for _ in requests]

    editor = Editor(4, paraphrase, ops=["paraphrase"], max_retries=5)
    out = await editor.mutate([Cand(["original phrase"])], [(0,)])
    assert [c.text for c, _ in out] == ["a fine phrase"] and len(calls) == 3
    # bounded: give up (drop the child) after max_retries regenerations
    never = Editor(4, scripted_paraphraser({"original phrase": "42"}), ops=["paraphrase"], max_retries=2)
    assert await never.mutate([Cand(["original phrase"])], [(0,)]) == []
    # deleting the only phrase would leave nothing: delete is not offered, and a non-alphabetic start
    # cannot be fixed by delete/swap
    assert await Editor(4, scripted_paraphraser(), ops=["delete", "swap"]).mutate([Cand(["x"])], [(0,)]) == []
    assert await Editor(4, scripted_paraphraser(), ops=["swap"]).mutate([Cand(["1,", "2."])], [(0,)]) == []


def test_clean_paraphrase() -> None:
    assert clean_paraphrase('\n  Paraphrase: "judge the mood"\nmore') == "judge the mood"
    assert clean_paraphrase("**read closely**") == "read closely"
    assert clean_paraphrase("") == ""


# ---------------------------------------------------------------------------------------------------------
# The six searches


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_search_improves_synthetic_objective(algorithm: str) -> None:
    search = new_search(algorithm)
    start = synthetic_value(Cand.from_text(START))
    await drive(search, 6)
    best, value = search.best_cand()
    assert value > start, (algorithm, best.text)
    assert value == synthetic_value(best)
    assert search.iteration == 6 and search.stopped  # budget of 6 iterations


async def test_patience_stops_every_search() -> None:
    for algorithm in ALGORITHMS:
        cfg = small_cfg(algorithm, patience=1, num_iterations=20)
        editor = Editor(1, scripted_paraphraser(), cfg.edits, 1, 2)
        search = make_search(algorithm, cfg, 1, editor)
        search.start(Cand.from_text(START), 100.0)  # nothing can beat it
        iterations = 0
        while not search.stopped:
            cands = await search.ask()
            if search.tell([0.0] * len(cands)):
                iterations += 1
        assert iterations == 2 and search.stall == 2, algorithm


def test_sa_temperature_and_acceptance() -> None:
    search = new_search("simulated_annealing")
    assert search.temperature(0) == pytest.approx(10.0)
    assert search.temperature(5) == pytest.approx(10.0 / math.e)


async def test_tabu_list_is_fifo_of_five() -> None:
    search = new_search("tabu", num_iterations=12)
    await drive(search, 12)
    tabu = search.state_dict()["extra"]["tabu"]
    assert len(tabu) == 5


async def test_genetic_crossover_produces_offspring() -> None:
    search = new_search("genetic_crossover", num_iterations=4)
    ops_seen = []
    for _ in range(4):
        while True:
            cands = await search.ask()
            ops_seen += search.asked_ops
            if search.tell([synthetic_value(c) for c in cands]):
                break
    assert ["crossover"] in ops_seen
    assert len(search.state_dict()["extra"]["population"]) == 4


@pytest.mark.parametrize("algorithm", ["simulated_annealing", "genetic_crossover", "harmony", "tabu"])
async def test_search_state_round_trip(algorithm: str) -> None:
    whole = new_search(algorithm, seed=11)
    await drive(whole, 5)

    first = new_search(algorithm, seed=11)
    await drive(first, 2)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = new_search(algorithm, seed=11)
    resumed.load_state_dict(state)
    await drive(resumed, 3)
    assert resumed.state_dict() == whole.state_dict()


# ---------------------------------------------------------------------------------------------------------
# Objective


def test_objective_balanced_accuracy_plus_entropy() -> None:
    task = Task(examples=[], template="{prompt} {input}", metric="label_accuracy", labels=["yes", "no"])
    examples = [Example(f"x{i}", t) for i, t in enumerate(["yes", "yes", "yes", "no"])]
    preds = ["yes", "yes", "no", "no"]
    per = [1.0, 1.0, 0.0, 1.0]
    scored = PromptScore("p", "train", 0.75, per, preds)
    # recall(yes) = 2/3, recall(no) = 1 -> balanced 5/6; predicted counts 2/2 -> entropy ln 2
    assert balanced_accuracy(per, [e.target for e in examples]) == pytest.approx(5 / 6)
    assert entropy([2, 2]) == pytest.approx(math.log(2)) and entropy([4, 0]) == 0.0 and entropy([]) == 0.0
    assert objective(scored, task, examples) == pytest.approx(100 * 5 / 6 + 10 * math.log(2))
    collapsed = PromptScore("p", "train", 0.75, [1.0, 1.0, 1.0, 0.0], ["yes"] * 4)
    assert objective(collapsed, task, examples) == pytest.approx(50.0)
    other = Task(examples=[], template="{prompt} {input}", metric="exact_match")
    assert objective(PromptScore("p", "train", 0.25, [0.25], ["a"]), other, examples[:1]) == pytest.approx(25.0)


# ---------------------------------------------------------------------------------------------------------
# Params, presets, registry


def test_params_defaults_presets_registry() -> None:
    p = PlumParams()
    assert p.algorithm == "genetic" and (p.num_iterations, p.num_candidates, p.patience) == (50, 10, 7)
    assert p.num_compose == 1 and p.edits == ["delete", "swap", "paraphrase", "add"]
    assert (p.sa_t_max, p.sa_k, p.tabu_size, p.tabu_admit_prob) == (10.0, 5.0, 5, 0.5)
    assert (p.hs_memory, p.hs_segments, p.hs_hmcr, p.hs_par) == (10, 5, 0.4, 0.5)
    assert (p.population_size, p.mutation_prob, p.crossover_tournament_size) == (10, 0.5, 2)
    assert p.num_offspring > 0 and p.train_subset is None
    for bad in ({"algorithm": "ga"}, {"num_candidates": 0}, {"edits": ["sub"]}, {"hs_hmcr": 1.5}, {"x": 1}):
        with pytest.raises(ValidationError):
            PlumParams(**bad)
    for name, preset in Plum.presets.items():
        assert PlumParams(**preset), name
    small = PlumParams(**Plum.presets["small"])
    assert (small.num_iterations, small.num_candidates, small.paraphrase_max_tokens) == (4, 3, 24)
    assert Plum.method == "plum" and Plum.params_model is PlumParams
    assert Plum.optimizer_needs == frozenset({Capability.GENERATE}) and Plum.scorer_needs == frozenset()
    assert METHODS["plum"] is Plum and get_method("plum") is Plum
    assert Plum(PlumParams(num_iterations=3), 0).total_steps == 3


# ---------------------------------------------------------------------------------------------------------
# Through the optimizer contract, with a scripted scorer (reuses the OPRO test doubles)


@pytest.mark.parametrize("algorithm", ["hill_climbing", "genetic_crossover"])
async def test_plum_optimizer_steps_and_resume(algorithm: str) -> None:
    from tests.test_opro import make_ctx

    params = PlumParams(algorithm=algorithm, num_iterations=3, num_candidates=3, population_size=3, num_offspring=2)
    # the scripted scorer is perfect with the word "magic" in the prompt; paraphrases insert it
    initial = "Read the review, then classify it as positive or negative."

    def reply(step, index):
        return "magic sentiment"

    ctx, _, _ = make_ctx(initial=initial, default=reply)
    ctx.optimizer_llm.by_seed = _AnySeed()
    plum = Plum(params, 5)
    reports = [await plum.step(ctx)]
    assert reports[0].candidates[0].prompt == initial
    assert 0.0 <= reports[0].candidates[0].score <= 1.0 and "objective" in reports[0].candidates[0].details
    reports.append(await plum.step(ctx))
    state = json.loads(json.dumps(plum.state_dict()))
    resumed = Plum(params, 5)
    resumed.load_state_dict(state)
    while not plum.done:
        a = await plum.step(ctx)
        b = await resumed.step(ctx)
        assert a == b
    assert resumed.done and resumed.state_dict() == plum.state_dict()
    best = plum.best()
    assert best.score == 1.0 and "magic" in best.prompt.lower()
    for report in reports:
        for cand in report.candidates:
            assert 0.0 <= cand.score <= 1.0
    with pytest.raises(RuntimeError):
        await plum.step(ctx)


class _AnySeed(dict):
    def __getitem__(self, key):
        return (0, 0)


# ---------------------------------------------------------------------------------------------------------
# Through the HTTP API


async def test_plum_job_runs_to_success(app_client, worker, fake_llm):
    body = label_job(method="plum")
    body["params"] = {"preset": "small", "algorithm": "hill_climbing", "num_iterations": 1}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["method"] == "plum"
    assert job["progress"]["total_steps"] == 1
    for key in ("initial", "best"):
        assert job[key]["dev_score"] is not None and job[key]["test_score"] is not None
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=score")).json()["items"]
    assert candidates and {c["step"] for c in candidates} <= {0, 1}
