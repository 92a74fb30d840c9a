"""End to end with the real local model (SmolLM2-135M on CPU) on a tiny budget, through the HTTP API,
a real SAQ worker on Redis and real Postgres."""

from __future__ import annotations

import asyncio

from tests.conftest import label_job, wait_for_status


async def test_opro_job_with_local_model(app_client, worker):
    body = label_job(
        backends={"scorer": "local", "optimizer": "local"},
        params={"steps": 1, "candidates_per_step": 2, "exemplars_per_step": 1, "optimizer_max_tokens": 40},
        budget={"max_llm_calls": 400},
    )
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] in {"completed", "budget"}
    assert 0 < job["usage"]["llm_calls"] <= 400
    for key in ("initial", "best"):
        assert 0.0 <= job[key]["test_score"] <= 1.0
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates")).json()["items"]
    assert candidates[0]["prompt"]

    predicted = await app_client.post(
        f"/v1/jobs/{job['id']}/predict", json={"inputs": ["Premise: A dog runs.\nHypothesis: An animal moves."]}
    )
    assert predicted.status_code == 200
    assert predicted.json()["predictions"][0]["output"] in {"entailment", "neutral", "contradiction"}


async def test_select_job_with_local_model(app_client, worker):
    """Label-free selection among three prompts on six train inputs, calibrated by CBM for the choice and for
    predictions; the choice is scored on dev and test like any job's best."""
    candidates = ["Answer Yes, Maybe or No.", "Does the first sentence imply the second?"]
    body = label_job(
        method="select",
        backends={"scorer": "local", "optimizer": "local"},
        task={"dataset": "builtin:snli16", "split": {"train": 0.5, "dev": 0.1, "test": 0.1}, "calibration": "cbm"},
        budget={"max_llm_calls": 200},
    )
    body["params"] = {"candidates": candidates, "criterion": "mi", "calibration": "cbm", "unlabeled_subset": 6}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded" and job["stop_reason"] == "completed", job
    assert job["spec"]["task"]["calibration"] == "cbm"
    # 3 prompts x 6 train inputs, at most two dev scorings of 6 and two test scorings of 6
    assert 0 < job["usage"]["llm_calls"] <= 3 * 6 + 2 * 6 + 2 * 6
    candidates_out = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step")).json()["items"]
    assert len(candidates_out) == 3
    (chosen,) = [c for c in candidates_out if c["details"]["selected"]]
    assert chosen["prompt"] == job["best"]["prompt"] and "mi" in chosen["details"]["chosen_by"]
    assert all(
        set(c["details"]["criteria"]) == {"mi", "ge", "mdl", "le", "zlp", "zpm", "zmv", "ppl"} for c in candidates_out
    )
    assert 0.0 <= job["best"]["test_score"] <= 1.0

    predicted = await app_client.post(
        f"/v1/jobs/{job['id']}/predict", json={"inputs": ["Premise: A dog runs.\nHypothesis: An animal moves."]}
    )
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["predictions"][0]["output"] in {"entailment", "neutral", "contradiction"}


async def test_apo_job_with_local_model(app_client, worker):
    body = label_job(backends={"scorer": "local", "optimizer": "local"}, method="apo", budget={"max_llm_calls": 300})
    body["params"] = {
        "preset": "small",
        "rounds": 1,
        "minibatch_size": 4,
        "mc_samples_per_step": 0,
        "samples_per_eval": 4,
        "optimizer_max_tokens": 48,
    }
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert 0 < job["usage"]["llm_calls"] <= 300
    assert job["stop_reason"] == "completed" and job["progress"]["step"] == 1
    assert job["best"]["test_score"] is not None
    steps = {c["step"] for c in (await app_client.get(f"/v1/jobs/{job['id']}/candidates")).json()["items"]}
    assert 0 in steps


async def test_plum_job_with_local_model(app_client, worker):
    body = label_job(backends={"scorer": "local", "optimizer": "local"}, method="plum", budget={"max_llm_calls": 200})
    body["params"] = {"preset": "small", "algorithm": "simulated_annealing", "num_iterations": 1, "num_candidates": 2}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed" and job["progress"]["step"] == 1
    assert 0 < job["usage"]["llm_calls"] <= 200
    assert job["best"]["test_score"] is not None


async def test_claps_job_with_local_model(app_client, worker):
    body = label_job(backends={"scorer": "local", "optimizer": "local"}, method="claps", budget={"max_llm_calls": 400})
    body["params"] = {"preset": "small", "n_clusters": 20, "prompt_length": 2, "train_subset": 4}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"}, wait_s=300)
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed" and job["progress"]["step"] == job["progress"]["total_steps"] == 4
    assert 0 < job["usage"]["llm_calls"] <= 400
    assert job["best"]["test_score"] is not None and job["initial"]["test_score"] is not None
    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?limit=100")).json()["items"]
    steps = {c["step"] for c in candidates}
    assert {0, 2} <= steps and len(candidates) >= 2 + 10  # manual + empty prompt, then the representatives
    assert "" in {c["prompt"] for c in candidates}


async def test_tiny_study_with_local_model(app_client, worker):
    """One arm and a baseline on one seed, on the real model: the leaderboard compares them on the same examples."""
    body = {
        "task": {"dataset": "builtin:snli16", "split": {"kind": "k_shot", "train_per_class": 2, "dev_per_class": 1}},
        "arms": [
            {
                "method": "opro",
                "params": {"steps": 1, "candidates_per_step": 1, "exemplars_per_step": 1, "optimizer_max_tokens": 40},
                "backends": {"scorer": "local", "optimizer": "local"},
            }
        ],
        "baselines": ["Answer entailment, neutral or contradiction."],
        "seeds": [0],
        "budget": {"max_llm_calls": 600},
    }
    body["arms"].append({"method": "evaluate", "name": "starting prompt", "backends": body["arms"][0]["backends"]})
    response = await app_client.post("/v1/studies", json=body)
    assert response.status_code == 202, response.text
    study_id = response.json()["id"]
    for _ in range(3000):
        study = (await app_client.get(f"/v1/studies/{study_id}")).json()
        if study["status"] == "completed":
            break
        await asyncio.sleep(0.2)
    assert study["jobs"]["succeeded"] == 3, study
    board = {row["arm"]: row for row in study["leaderboard"]}
    opro = board["opro"]
    assert opro["finished"] == 1 and 0.0 <= opro["test_mean"] <= 1.0
    (versus,) = [c for c in opro["comparisons"] if c["against"] == "baseline 1"]
    assert versus["n"] == 48 - 3 * 3 and versus["test"] == "exact McNemar"
