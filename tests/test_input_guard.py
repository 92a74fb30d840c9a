"""Hostile and careless input: NUL and other control characters, huge bodies, deep JSON. Always a 4xx naming where,
never a 500, and nothing reaches the database or a job."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from app.input_guard import disallowed_at
from app.main import create_app
from app.settings import ApiSettings, InputLimits
from tests.conftest import label_job


def error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    return body["error"]


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"initial_prompt": "Relate\x00 the sentences."}, ["body", "initial_prompt"]),
        ({"task": {"dataset": "builtin:snli16\x00"}}, ["body", "task", "dataset"]),
        ({"params": {"steps": 2, "bad\x01key": 1}}, ["body", "params", "bad\x01key"]),
        ({"initial_prompt": "half a surrogate \ud800"}, ["body", "initial_prompt"]),
    ],
)
async def test_control_characters_in_a_job_are_a_422_naming_the_field(app_client, patch, loc):
    body = label_job(**patch)
    raw = json.dumps(body)  # \u0000 and \ud800 escapes: valid JSON, text Postgres cannot store
    response = await app_client.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    detail = error(response)["details"][0]
    assert detail["loc"] == [str(p) for p in loc] and "disallowed character" in detail["msg"]
    listed = (await app_client.get("/v1/jobs")).json()["items"]
    assert not any("\x00" in (j.get("initial_prompt") or "") for j in listed)


async def test_tab_and_newline_are_fine(app_client):
    body = label_job(initial_prompt="Relate the\tsentences.\nThink first.")
    assert (await app_client.post("/v1/jobs", json=body)).status_code == 202


@pytest.mark.parametrize("query", ["method=%00opro", "status=run%01ning", "cursor=%00"])
async def test_control_characters_in_a_query_are_a_422(app_client, query):
    response = await app_client.get(f"/v1/jobs?{query}")
    assert response.status_code == 422, response.text
    assert error(response)["details"][0]["loc"] == ["query", query.split("=")[0]]


async def test_deep_json_is_a_422_not_a_500(app_client):
    deep = "[" * 100_000 + "]" * 100_000
    for path in ("/v1/datasets", "/v1/jobs"):
        response = await app_client.post(path, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "nested deeper" in error(response)["message"]
    shallow_enough = {"name": "nest", "examples": [{"input": "a", "target": "b"}], "x": [[[[1]]]]}
    response = await app_client.post("/v1/datasets", json=shallow_enough)
    assert response.status_code == 422 and "nested" not in response.text  # the schema's own error (extra field)


async def test_bodies_over_the_limit_are_413_before_being_read(settings):
    limited = settings.model_copy(update={"api": settings.api.model_copy(update={"max_body_bytes": 4096})})
    app = create_app(limited)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            big = {"name": "big", "examples": [{"input": "x" * 5000, "target": "y"}]}
            response = await client.post("/v1/datasets", json=big)
            assert response.status_code == 413
            assert error(response)["code"] == "payload_too_large" and "4096" in error(response)["message"]

            async def streamed():  # no content-length: counted as it streams in
                for _ in range(10):
                    yield b'{"name": "' + b"x" * 1000

            response = await client.post(
                "/v1/datasets", content=streamed(), headers={"content-type": "application/json"}
            )
            assert response.status_code == 413
            small = {"name": "small", "examples": [{"input": "x", "target": "y"}]}
            assert (await client.post("/v1/datasets", json=small)).status_code == 201


async def test_a_jsonl_upload_with_a_nul_names_the_line(app_client):
    lines = [json.dumps({"input": "fine", "target": "a"}), json.dumps({"input": "bad\x00", "target": "b"})]
    files = {"file": ("data.jsonl", ("\n".join(lines)).encode(), "application/x-ndjson")}
    response = await app_client.post("/v1/datasets", files=files, data={"name": "nul"})
    assert response.status_code == 422, response.text
    assert error(response)["details"][0]["loc"] == ["body", "file", "line 2", "input"]


def test_disallowed_at_finds_the_path_at_any_depth():
    assert disallowed_at({"a": [1, {"b": "ok\tfine\n"}]}) is None
    assert disallowed_at({"a": [1, {"b": "no\x00"}]})[0] == ["a", 1, "b"]
    deep: list = []
    node = deep
    for _ in range(5000):
        node.append([])
        node = node[0]
    assert disallowed_at(deep, max_depth=64)[1] == "nested deeper than 64 levels"


@pytest.fixture
async def tight_client(settings):
    """The API with small configured input limits."""
    limits = InputLimits(
        max_template_chars=200,
        max_prompt_chars=150,
        max_labels=3,
        max_label_chars=20,
        max_examples_per_dataset=4,
        max_example_chars=100,
        max_predict_inputs=2,
    )
    app = create_app(settings.model_copy(update={"api": ApiSettings(limits=limits)}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client


@pytest.mark.parametrize(
    ("patch", "loc", "setting"),
    [
        ({"task": {"template": "{prompt} {input}" + "x" * 200}}, ["body", "task", "template"], "max_template_chars"),
        ({"initial_prompt": "y" * 151}, ["body", "initial_prompt"], "max_prompt_chars"),
        ({"task": {"labels": ["a", "b", "c", "d"]}}, ["body", "task", "labels"], "max_labels"),
        ({"task": {"labels": ["a", "b" * 21]}}, ["body", "task", "labels", "1"], "max_label_chars"),
        (
            {"task": {"labels": ["a", "b"], "verbalizer": {"a": "z" * 21}}},
            ["body", "task", "verbalizer", "a"],
            "max_label_chars",
        ),
        (
            {"task": {"labels": ["a", "b"], "verbalizer": {"a": [" a", "z" * 21]}}},
            ["body", "task", "verbalizer", "a", "1"],
            "max_label_chars",
        ),
    ],
)
async def test_job_strings_and_lists_are_bounded_by_settings(tight_client, patch, loc, setting):
    newest_before = (await tight_client.get("/v1/jobs", params={"limit": 1})).json()["items"]
    response = await tight_client.post("/v1/jobs", json=label_job(**patch))
    assert response.status_code == 422, response.text
    detail = error(response)["details"][0]
    assert detail["loc"] == loc and f"api.limits.{setting}" in detail["msg"]
    assert (await tight_client.get("/v1/jobs", params={"limit": 1})).json()["items"] == newest_before  # none stored


async def test_within_the_limits_is_accepted(tight_client):
    response = await tight_client.post("/v1/jobs", json=label_job(initial_prompt="y" * 150))
    assert response.status_code == 202, response.text


async def test_dataset_examples_are_bounded_by_settings(tight_client):
    name = f"bounded-{uuid.uuid4().hex[:8]}"

    def body(examples):
        return {"name": name, "examples": examples}

    five = [{"input": f"i{n}", "target": "t"} for n in range(5)]
    too_many = await tight_client.post("/v1/datasets", json=body(five))
    assert too_many.status_code == 422 and error(too_many)["details"][0]["loc"] == ["body", "examples"]
    too_long = await tight_client.post("/v1/datasets", json=body([five[0], {"input": "x" * 101, "target": "t"}]))
    assert error(too_long)["details"][0]["loc"] == ["body", "examples", "1", "input"]
    jsonl = "\n".join(json.dumps(e) for e in five).encode()
    upload = await tight_client.post(
        "/v1/datasets", files={"file": ("d.jsonl", jsonl, "application/x-ndjson")}, data={"name": name}
    )
    assert upload.status_code == 422 and error(upload)["details"][0]["loc"] == ["body", "file"]
    stored = (await tight_client.get("/v1/datasets", params={"limit": 200})).json()["items"]
    assert name not in {d["name"] for d in stored}
    assert (await tight_client.post("/v1/datasets", json=body(five[:4]))).status_code == 201


async def test_predict_inputs_are_bounded_by_settings(tight_client):
    response = await tight_client.post("/v1/jobs/any/predict", json={"inputs": ["a", "b", "c"]})
    assert response.status_code == 422 and error(response)["details"][0]["loc"] == ["body", "inputs"]
    response = await tight_client.post("/v1/jobs/any/predict", json={"inputs": ["a", "b" * 101]})
    assert error(response)["details"][0]["loc"] == ["body", "inputs", "1"]


async def test_schema_ceilings_hold_whatever_the_settings(app_client):
    response = await app_client.post("/v1/jobs", json=label_job(task={"dataset": "d" * 201}))
    assert response.status_code == 422 and error(response)["details"][0]["loc"] == ["body", "task", "dataset"]
