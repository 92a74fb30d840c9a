"""Embedded mode: API, worker, SQLite (same migrations) and the in-process queue in one process."""

from __future__ import annotations

import httpx

from tests.conftest import label_job, wait_for_status
from workers.embedded import create_embedded_app, embedded_settings


async def test_embedded_mode_runs_a_job(settings, tmp_path):
    embedded = embedded_settings(settings, tmp_path / "embedded.db")
    assert embedded.database_url.startswith("sqlite+aiosqlite:///")
    app = create_embedded_app(embedded)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://e") as client:
            job_id = (await client.post("/v1/jobs", json=label_job())).json()["id"]
            job = await wait_for_status(client, job_id, {"succeeded", "failed"})
            assert job["status"] == "succeeded", job
            assert job["best"]["test_score"] is not None
            # A second identical job is served from the SQLite evaluation cache.
            job2_id = (await client.post("/v1/jobs", json=label_job())).json()["id"]
            job2 = await wait_for_status(client, job2_id, {"succeeded"})
            assert job2["usage"]["llm_calls"] == 0
            assert job2["usage"]["cache_hits"] > 0
            assert job2["best"] == job["best"]
            ready = await client.get("/readyz")
            assert ready.status_code == 200
