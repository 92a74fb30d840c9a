"""API keys, readiness and metrics."""

from __future__ import annotations

import httpx

from app.main import create_app


async def test_api_keys_select_tenant(settings):
    keyed = settings.model_copy(update={"api_keys": ["team-a:secret-a", "secret-b"]})
    app = create_app(keyed)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            assert (await client.get("/v1/jobs")).status_code == 401
            assert (await client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"})).status_code == 401
            body = {"name": "private", "examples": [{"input": "a", "target": "b"}]}
            created = await client.post("/v1/datasets", json=body, headers={"Authorization": "Bearer secret-a"})
            assert created.status_code == 201
            dataset_id = created.json()["id"]
            # Another tenant cannot see it.
            other = await client.get(f"/v1/datasets/{dataset_id}", headers={"X-API-Key": "secret-b"})
            assert other.status_code == 404
            mine = await client.get(f"/v1/datasets/{dataset_id}", headers={"X-API-Key": "secret-a"})
            assert mine.status_code == 200
            # Liveness needs no key.
            assert (await client.get("/healthz")).status_code == 200


async def test_readyz_and_metrics(app_client):
    ready = await app_client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"]["database"] == "ok" and ready.json()["checks"]["queue"] == "ok"
    await app_client.post("/v1/jobs", json={"method": "opro", "task": {"dataset": "builtin:snli16"}})
    metrics = await app_client.get("/metrics")
    assert 'promptopt_jobs_submitted_total{method="opro"}' in metrics.text
