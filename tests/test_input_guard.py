"""Hostile and careless input: NUL and other control characters, huge bodies, deep JSON. Always a 4xx naming where,
never a 500, and nothing reaches the database or a job."""

from __future__ import annotations

import json

import httpx
import pytest

from app.input_guard import disallowed_at
from app.main import create_app
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
