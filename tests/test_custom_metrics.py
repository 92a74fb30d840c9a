"""regex, json_schema, set_match and the LLM judge: scores, submission checks, and the judge's calls cached and
charged like any other on the fake server; OPRO runs on a generation task judged by it."""

from __future__ import annotations

import pytest

from app.evaluation.judge import JudgeSpec, judge_request, parse_grade
from app.evaluation.metrics import json_schema, regex, set_match, target_problem
from tests.conftest import wait_for_status
from tests.fakes.fake_vllm import CHAT

SCHEMA = '{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}'


def test_regex_json_schema_and_set_match():
    assert regex("The answer is 42.", r"\b42\b") == 1.0 and regex("4242", r"\b42\b") == 0.0
    assert json_schema('Here you go:\n```json\n{"name": "Ada"}\n```', SCHEMA) == 1.0
    assert json_schema('{"name": 3}', SCHEMA) == 0.0 and json_schema("no json here", SCHEMA) == 0.0
    assert set_match("red, green; blue", "Blue\nred\ngreen") == 1.0
    assert set_match("red, green", "red, blue") == pytest.approx(0.5)  # F1: one of two right on both sides
    assert set_match("", "") == 1.0 and set_match("x", "") == 0.0
    assert target_problem("regex", "(unclosed") is not None and target_problem("regex", "ok+") is None
    assert "JSON Schema" in target_problem("json_schema", '{"type": 12}')
    assert target_problem("json_schema", SCHEMA) is None


def test_judge_prompt_and_grade_parsing():
    spec = JudgeSpec(rubric="Is it polite?", scale_min=1, scale_max=5)
    request = judge_request(spec, "Say hi", "Hello!", "Go away.")
    assert "Is it polite?" in request.prompt and "Go away." in request.prompt and request.temperature == 0.0
    assert parse_grade("4", spec) == pytest.approx(0.75)
    assert parse_grade("Grade: 5/5", spec) == 1.0
    assert parse_grade("I'd say 9 out of 10... no, 2", spec) == pytest.approx(0.25)  # 9 is off the scale
    assert parse_grade("excellent", spec) == 0.0


def generation_examples(n: int = 12) -> list[dict]:
    return [{"input": f"Greet person number {i}.", "target": f"Hello, person {i}!"} for i in range(n)]


def judged_job(dataset_id: str, **task) -> dict:
    return {
        "method": "opro",
        "task": {
            "dataset": dataset_id,
            "template": "{prompt}\n{input}",
            "metric": "llm_judge",
            "judge": {"rubric": "Grade how friendly the greeting is.", "scale_min": 1, "scale_max": 10},
            "max_new_tokens": 12,
            **task,
        },
        "params": {"steps": 1, "candidates_per_step": 2, "exemplars_per_step": 1},
        "budget": {"max_llm_calls": 500},
        "initial_prompt": "Write a greeting.",
    }


async def test_a_generation_task_judged_by_a_model(app_client, worker, fake_llm):
    def grades(kind, body):
        if kind == CHAT and "Grade the response" in body["messages"][-1]["content"]:
            return {"text": "8"}  # (8 - 1) / 9
        return None

    fake_llm.responder = grades
    dataset = (await app_client.post("/v1/datasets", json={"name": "greet", "examples": generation_examples()})).json()
    first = (await app_client.post("/v1/jobs", json=judged_job(dataset["id"]))).json()
    first = await wait_for_status(app_client, first["id"], {"succeeded", "failed"})
    assert first["status"] == "succeeded", first
    assert first["best"]["test_score"] == pytest.approx(7 / 9, abs=1e-4)  # every output graded 8 of 1..10
    judged = [r for r in fake_llm.requests(CHAT) if "Grade the response" in r.body["messages"][-1]["content"]]
    assert judged and first["usage"]["llm_calls"] >= len(judged)  # the judge's calls are charged to the job

    calls_before = len(fake_llm.requests(CHAT))
    again = (await app_client.post("/v1/jobs", json=judged_job(dataset["id"]))).json()
    again = await wait_for_status(app_client, again["id"], {"succeeded", "failed"})
    assert again["usage"]["llm_calls"] == 0 and again["usage"]["cache_hits"] > 0  # answers and grades cached
    assert len(fake_llm.requests(CHAT)) == calls_before


@pytest.mark.parametrize(
    ("task", "loc"),
    [
        ({"judge": None}, ["body", "task", "judge"]),
        ({"judge": {"rubric": "x", "backend": "nope"}}, ["body", "task", "judge", "backend"]),
        ({"judge": {"rubric": "x", "scale_min": 5, "scale_max": 5}}, ["body", "task", "judge"]),
    ],
)
async def test_judge_settings_are_checked(app_client, task, loc):
    dataset = (await app_client.post("/v1/datasets", json={"name": "g", "examples": generation_examples()})).json()
    response = await app_client.post("/v1/jobs", json=judged_job(dataset["id"], **task))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == loc


async def test_a_bad_pattern_in_the_data_is_a_422(app_client):
    examples = [{"input": f"q{i}", "target": "ok+" if i else "(unclosed"} for i in range(5)]
    dataset = (await app_client.post("/v1/datasets", json={"name": "r", "examples": examples})).json()
    body = judged_job(dataset["id"], metric="regex")
    del body["task"]["judge"]
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422 and "example 0" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("apo", {"preset": "small", "rounds": 1, "minibatch_size": 4, "samples_per_eval": 4}),
        ("plum", {"preset": "small", "num_iterations": 1, "num_candidates": 2}),
    ],
)
async def test_apo_and_plum_on_a_judged_generation_task(app_client, worker, fake_llm, method, params):
    fake_llm.responder = lambda kind, body: (
        {"text": "6"} if kind == CHAT and "Grade the response" in body["messages"][-1]["content"] else None
    )
    dataset = (await app_client.post("/v1/datasets", json={"name": "g", "examples": generation_examples()})).json()
    body = judged_job(dataset["id"])
    body |= {"method": method, "params": params, "initial_prompt": f"Write a greeting ({method})."}
    job = (await app_client.post("/v1/jobs", json=body)).json()
    job = await wait_for_status(app_client, job["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["best"]["test_score"] == pytest.approx(5 / 9, abs=1e-4)
