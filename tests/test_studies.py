"""Evaluation protocol (k-shot splits, a separate test dataset, intervals on test scores) and studies: arms x seeds
on identical splits, a leaderboard with statistics, cancellation."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from app.datasets.builtin import BUILTIN_TASKS
from app.evaluation.splits import SplitSpec, k_shot_indices
from tests.conftest import label_job, wait_for_status

SNLI = BUILTIN_TASKS["snli16"]


def targets_of(name: str) -> list[str]:
    return [ex["target"] for ex in BUILTIN_TASKS[name].examples()]


def test_k_shot_split_is_balanced_disjoint_and_seeded():
    targets = targets_of("dbpedia16")
    spec = SplitSpec(kind="k_shot", train_per_class=4, dev_per_class=2, seed=5)
    split = k_shot_indices(targets, spec)
    classes = set(targets)
    assert Counter(targets[i] for i in split["train"]) == {c: 4 for c in classes}
    assert Counter(targets[i] for i in split["dev"]) == {c: 2 for c in classes}
    train, dev, test = (set(split[s]) for s in ("train", "dev", "test"))
    assert not (train & dev or train & test or dev & test)
    assert train | dev | test == set(range(len(targets)))  # the rest is the test set
    assert k_shot_indices(targets, spec) == split  # the same seed, the same split
    assert k_shot_indices(targets, SplitSpec(kind="k_shot", train_per_class=4, dev_per_class=2, seed=6)) != split


def test_k_shot_dev_defaults_to_train_per_class_and_small_classes_fill_train_first():
    targets = ["a"] * 10 + ["b"] * 3
    split = k_shot_indices(targets, SplitSpec(kind="k_shot", train_per_class=2, seed=0))
    assert Counter(targets[i] for i in split["dev"]) == {"a": 2, "b": 1}
    assert Counter(targets[i] for i in split["train"]) == {"a": 2, "b": 2}
    assert Counter(targets[i] for i in split["test"]) == {"a": 6}


async def test_a_job_with_a_k_shot_split_and_a_separate_test_dataset(app_client, worker):
    examples = SNLI.examples()
    uploaded = await app_client.post("/v1/datasets", json={"name": "held-out snli", "examples": examples[:20]})
    body = label_job(task={"split": {"kind": "k_shot", "train_per_class": 3, "dev_per_class": 2, "seed": 1}})
    body["task"]["test_dataset"] = uploaded.json()["id"]
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    for entry in (job["initial"], job["best"]):
        assert entry["test_n"] == 20  # the other dataset, whole
        assert entry["test_low"] <= entry["test_score"] <= entry["test_high"]
        assert entry["test_method"] == "wilson" and entry["test_stderr"] > 0


@pytest.mark.parametrize(
    ("task_patch", "loc"),
    [
        ({"split": {"kind": "k_shot"}}, ["body", "task", "split"]),
        ({"split": {"train_per_class": 3}}, ["body", "task", "split"]),
        ({"test_dataset": "builtin:nope"}, ["body", "task", "test_dataset"]),
        ({"split": {"kind": "k_shot", "train_per_class": 500}}, ["body", "task", "split"]),
    ],
)
async def test_bad_protocol_options_are_422(app_client, task_patch, loc):
    response = await app_client.post("/v1/jobs", json=label_job(task=task_patch))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == loc


def study_body(**overrides) -> dict:
    body = {
        "name": "snli arms",
        "task": {"dataset": "builtin:snli16", "split": {"kind": "k_shot", "train_per_class": 4, "dev_per_class": 2}},
        "initial_prompt": "Relate the two sentences.",
        "arms": [
            {"method": "opro", "params": {"steps": 1, "candidates_per_step": 2, "exemplars_per_step": 1}},
            {"method": "opro", "name": "opro-2", "params": {"steps": 2, "candidates_per_step": 2}},
        ],
        "seeds": [0, 1],
        "baselines": ["Does the first sentence entail the second?"],
    }
    body.update(overrides)
    return body


async def test_a_study_runs_every_arm_and_seed_on_identical_splits(app_client, worker):
    created = await app_client.post("/v1/studies", json=study_body())
    assert created.status_code == 202, created.text
    study_id = created.json()["id"]
    assert sum(created.json()["jobs"].values()) == 6  # (2 arms + 1 baseline) x 2 seeds
    study = {}
    for _ in range(600):
        study = (await app_client.get(f"/v1/studies/{study_id}")).json()
        if study["status"] == "completed":
            break
        await asyncio.sleep(0.1)
    assert study["status"] == "completed", study
    assert study["jobs"]["succeeded"] == 6

    runs = study["runs"]
    assert {(r["arm"], r["seed"]) for r in runs} == {(a, s) for a in ("opro", "opro-2", "baseline 1") for s in (0, 1)}
    # Identical splits per seed: every run of a seed scored the initial prompt on the same test set.
    for seed in (0, 1):
        initial = {r["initial_test_score"] for r in runs if r["seed"] == seed and r["arm"] != "baseline 1"}
        assert len(initial) == 1
    jobs = [(await app_client.get(f"/v1/jobs/{r['job_id']}")).json() for r in runs]
    assert {j["spec"]["task"]["split"]["seed"] for j in jobs} == {0, 1}
    assert len({j["initial"]["test_n"] for j in jobs}) == 1

    board = {row["arm"]: row for row in study["leaderboard"]}
    assert set(board) == {"opro", "opro-2", "baseline 1"}
    means = [row["test_mean"] for row in study["leaderboard"]]
    assert means == sorted(means, reverse=True)
    opro = board["opro"]
    assert opro["runs"] == opro["finished"] == 2
    scores = [r["test_score"] for r in runs if r["arm"] == "opro"]
    assert opro["test_mean"] == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert opro["test_interval"]["low"] <= opro["test_mean"] <= opro["test_interval"]["high"]
    assert opro["mean_llm_calls"] > 0
    against = {c["against"]: c for c in opro["comparisons"]}
    assert set(against) == {"initial", "baseline 1"}
    for comparison in against.values():
        assert comparison["n"] == 2 * jobs[0]["initial"]["test_n"]  # pooled over both seeds
        assert comparison["test"] == "exact McNemar"  # label accuracy: 0/1 outcomes
        assert 0 < comparison["p_value"] <= 1
        assert comparison["wins"] + comparison["losses"] + comparison["ties"] == comparison["n"]
    assert board["baseline 1"]["baseline"] and board["baseline 1"]["comparisons"] == []

    listed = (await app_client.get("/v1/studies")).json()["items"]
    assert study_id in {s["id"] for s in listed}


async def test_cancelling_a_study_cancels_its_runs(app_client):
    created = (await app_client.post("/v1/studies", json=study_body())).json()
    cancelled = await app_client.post(f"/v1/studies/{created['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["jobs"]["cancelled"] == 6
    study = (await app_client.get(f"/v1/studies/{created['id']}")).json()
    assert all(r["status"] == "cancelled" for r in study["runs"])
    assert (await app_client.post("/v1/studies/nope/cancel")).status_code == 404


async def test_a_study_budget_caps_every_run(app_client):
    created = await app_client.post("/v1/studies", json=study_body(budget={"max_llm_calls": 1200}))
    assert created.status_code == 202, created.text
    study = (await app_client.get(f"/v1/studies/{created.json()['id']}")).json()
    caps = set()
    for run in study["runs"]:
        caps.add((await app_client.get(f"/v1/jobs/{run['job_id']}")).json()["spec"]["budget"]["max_llm_calls"])
    assert caps == {200}  # 1200 over 6 runs
    too_small = await app_client.post("/v1/studies", json=study_body(budget={"max_llm_calls": 5}))
    assert too_small.status_code == 422
    assert too_small.json()["error"]["details"][0]["loc"] == ["body", "budget", "max_llm_calls"]


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"arms": []}, ["body", "arms"]),
        ({"arms": [{"method": "nope"}]}, ["body", "arms", "0", "method"]),
        ({"arms": [{"method": "opro", "params": {"steps": -1}}]}, ["body", "arms", "0", "params", "steps"]),
        (
            {"arms": [{"method": "opro", "backends": {"scorer": "missing"}}]},
            ["body", "arms", "0", "backends", "scorer"],
        ),
        ({"seeds": [1, 1]}, ["body", "seeds"]),
        ({"task": {"dataset": "builtin:nope"}}, ["body", "task", "dataset"]),
    ],
)
async def test_bad_studies_are_422_at_the_field(app_client, patch, loc):
    response = await app_client.post("/v1/studies", json=study_body(**patch))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == loc
