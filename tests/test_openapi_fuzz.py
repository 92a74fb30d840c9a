"""The OpenAPI document keeps its promises: schemathesis fuzzes every operation of the real app (Postgres, Redis,
the fake LLM backend) in-process and checks each answer against the document; plain tests pin what the fuzzer
cannot see for itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from app.main import create_app
from app.settings import Settings
from tests.conftest import label_job, wait_for_status

# Bounds the run (about 40 s on two cores, some 4,300 requests); derandomized, so a failure reproduces.
FUZZ_CONFIG = {
    "seed": 20261204,
    "generation": {"mode": "all", "max-examples": 100, "deterministic": True, "database": "none"},
    "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    # A job's event stream runs until the job ends; no worker runs here, so a queued job's stream would not.
    "request-timeout": 5,
    "max-stream-events": 5,
}
RESPONSE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
CHECKS = [
    *RESPONSE_CHECKS,
    negative_data_rejection,
    unsupported_method,  # 405 with `Allow` for a method the path does not have
]


# Loaded from the document rather than from the app (`from_asgi` would start the app's lifespan at import, before
# the test database exists) or a fixture (`schemathesis.pytest.from_fixture` rewrites a private attribute of pytest's
# test items that pytest 9.0.3 no longer has). The document does not depend on settings or services;
# test_fuzzed_document_is_served checks that the running app serves it.
DOCUMENT = create_app(Settings()).openapi()
fuzzed = schemathesis.openapi.from_dict(DOCUMENT, config=SchemathesisConfig.from_dict(FUZZ_CONFIG))


@pytest.fixture
def fuzz_app(settings: Settings) -> Iterator[FastAPI]:
    # Without the request rate limit: the coverage phase's bursts would mostly be answered 429 (documented, but
    # then the routes behind it go unexercised).
    limits = settings.quotas.default.model_copy(update={"requests_per_second": None, "submissions_per_minute": None})
    quotas = settings.quotas.model_copy(update={"default": limits})
    yield create_app(settings.model_copy(update={"quotas": quotas}))
    shutdown_lifespans()  # the app's lifespan ran on schemathesis's event loop; close its pools before the test DB goes


@fuzzed.parametrize()
# `fuzz_app` is one app for all of an operation's cases, as a server would be.
@hypothesis.settings(
    suppress_health_check=[
        hypothesis.HealthCheck.function_scoped_fixture,
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.filter_too_much,
        hypothesis.HealthCheck.data_too_large,
    ]
)
def test_api_keeps_its_openapi_promises(case, fuzz_app):
    case.call_and_validate(app=fuzz_app, checks=CHECKS)


async def test_fuzzed_document_is_served(app_client):
    assert (await app_client.get("/openapi.json")).json() == DOCUMENT


def conforms(method: str, path: str, response: httpx.Response, **path_parameters: str) -> None:
    case = fuzzed[path][method].Case(path_parameters=path_parameters)
    case.validate_response(response, checks=RESPONSE_CHECKS)


async def test_a_finished_jobs_answers_conform(app_client, worker):
    """What the fuzzer cannot reach on its own: a job that ran, with candidates, events and a best prompt."""
    submitted = await app_client.post("/v1/jobs", json=label_job())
    conforms("POST", "/v1/jobs", submitted)
    job_id = submitted.json()["id"]
    await wait_for_status(app_client, job_id, {"succeeded"})
    for method, path, kwargs in [
        ("GET", "/v1/jobs", {}),
        ("GET", "/v1/jobs/{job_id}", {}),
        ("GET", "/v1/jobs/{job_id}/candidates", {}),
        ("GET", "/v1/jobs/{job_id}/events", {}),
        ("GET", "/v1/jobs/{job_id}/artifact", {}),  # a text prompt has none: 404
        ("POST", "/v1/jobs/{job_id}/predict", {"json": {"inputs": ["A man sleeps. A man is awake."]}}),
        ("POST", "/v1/jobs/{job_id}/cancel", {}),
    ]:
        response = await app_client.request(method, path.format(job_id=job_id), **kwargs)
        assert response.status_code < 500, response.text
        conforms(method, path, response, **({"job_id": job_id} if "{job_id}" in path else {}))
    events = await app_client.get(f"/v1/jobs/{job_id}/events")
    assert events.headers["content-type"].startswith("text/event-stream") and "event: state" in events.text


async def test_non_utf8_json_is_a_422(app_client):
    response = await app_client.post(
        "/v1/jobs", content=b'{"method": "\xff"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == ["body"]


def _resolve(doc: dict, ref: str) -> Any:
    assert ref.startswith("#/"), f"non-local $ref {ref}"
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_every_ref_resolves(app_client):
    doc = (await app_client.get("/openapi.json")).json()
    refs = set(_refs(doc))
    assert refs
    for ref in refs:
        _resolve(doc, ref)


async def test_v1_routes_document_their_errors(app_client):
    doc = (await app_client.get("/openapi.json")).json()
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    operations = [(path, method, op) for path, ops in doc["paths"].items() for method, op in ops.items()]
    assert len([op for path, _, op in operations if path.startswith("/v1/")]) >= 12
    for path, method, op in operations:
        responses = op["responses"]
        codes = {"401", "422", "429", "503"} if path.startswith("/v1/") else {"422"}
        if "requestBody" in op:
            codes.add("413")
        if "{" in path:
            codes.add("404")
        assert codes <= set(responses), f"{method.upper()} {path} documents {sorted(responses)}"
        for code in codes:
            assert responses[code]["content"] == {"application/json": {"schema": error_ref}}, (method, path, code)
        for code in {"429", "503"} & codes:
            assert responses[code]["headers"]["Retry-After"]["required"] is True
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's 422 body is not the one we send


async def test_media_types_documented(app_client):
    doc = (await app_client.get("/openapi.json")).json()
    paths = doc["paths"]
    assert list(paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]) == ["text/event-stream"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(paths["/v1/jobs/{job_id}/artifact"]["get"]["responses"]["200"]["content"]) == ["application/json"]
    readyz = paths["/readyz"]["get"]["responses"]
    assert readyz["503"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Readiness"}


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/jobs", "GET, POST"),  # two routes share the path
        ("PUT", "/v1/jobs/some-id", "GET"),
        ("GET", "/v1/jobs/some-id/cancel", "POST"),
        ("POST", "/healthz", "GET"),
    ],
)
async def test_method_not_allowed_names_the_allowed_methods(app_client, method, path, allowed):
    response = await app_client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


async def test_cursor_errors_point_at_the_query(app_client):
    # Cursors are opaque base64url JSON handed out as `next_cursor`; "#" is not one.
    for path in ("/v1/jobs?cursor=%23", "/v1/datasets?cursor=%23"):
        response = await app_client.get(path)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["details"][0]["loc"] == ["query", "cursor"]


async def test_cursor_from_a_page_is_accepted(app_client):
    for name in ("a", "b"):
        created = await app_client.post(
            "/v1/datasets", json={"name": name, "examples": [{"input": "x", "target": "y"}]}
        )
        assert created.status_code == 201, created.text
    first = (await app_client.get("/v1/datasets?limit=1")).json()
    assert first["next_cursor"]
    response = await app_client.get("/v1/datasets", params={"limit": 1, "cursor": first["next_cursor"]})
    assert response.status_code == 200, response.text
