"""Idempotency-Key on POST /v1/jobs and /v1/datasets: a retry returns the original answer and creates nothing; the
same key with another body is a 409; keys are per tenant; two racing requests with one key create one job."""

from __future__ import annotations

import asyncio

import httpx

from app.main import create_app
from tests.conftest import label_job


async def job_ids(client) -> list[str]:
    return [j["id"] for j in (await client.get("/v1/jobs?limit=200")).json()["items"]]


async def test_a_retried_submission_returns_the_original_job(app_client, tmp_path):
    body = label_job(initial_prompt=f"Relate the sentences {tmp_path.name}.")
    key = {"Idempotency-Key": f"submit-{tmp_path.name}"}
    first = await app_client.post("/v1/jobs", json=body, headers=key)
    again = await app_client.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers.get("idempotent-replayed") == "true"
    assert (await job_ids(app_client)).count(first.json()["id"]) == 1
    other = await app_client.post("/v1/jobs", json={**body, "seed": 9}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "conflict"
    fresh = await app_client.post("/v1/jobs", json=body)  # no key: a new job, as before
    assert fresh.json()["id"] != first.json()["id"]


async def test_racing_requests_with_one_key_create_one_job(app_client, tmp_path):
    body = label_job(initial_prompt=f"Race {tmp_path.name}.")
    key = {"Idempotency-Key": f"race-{tmp_path.name}"}
    before = set(await job_ids(app_client))
    answers = await asyncio.gather(*(app_client.post("/v1/jobs", json=body, headers=key) for _ in range(4)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    assert len(set(await job_ids(app_client)) - before) == 1


async def test_dataset_uploads_are_idempotent_too(app_client, tmp_path):
    body = {"name": f"idem-{tmp_path.name}", "examples": [{"input": "a", "target": "b"}]}
    key = {"Idempotency-Key": f"ds-{tmp_path.name}"}
    first = await app_client.post("/v1/datasets", json=body, headers=key)
    again = await app_client.post("/v1/datasets", json=body, headers=key)
    assert first.status_code == again.status_code == 201 and again.json()["id"] == first.json()["id"]
    changed = {**body, "examples": [{"input": "a", "target": "c"}]}
    assert (await app_client.post("/v1/datasets", json=changed, headers=key)).status_code == 409


async def test_keys_belong_to_a_tenant(settings, tmp_path):
    keyed = settings.model_copy(update={"api_keys": ["team-a:key-a", "team-b:key-b"]})
    app = create_app(keyed)
    body = {"name": f"tenant-{tmp_path.name}", "examples": [{"input": "a", "target": "b"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            made = []
            for tenant in ("a", "b"):
                headers = {"Authorization": f"Bearer key-{tenant}", "Idempotency-Key": "same-key"}
                answer = await client.post("/v1/datasets", json=body, headers=headers)
                assert answer.status_code == 201 and "idempotent-replayed" not in answer.headers
                made.append(answer.json()["id"])
    assert made[0] != made[1]
