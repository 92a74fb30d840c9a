"""Jobs through the HTTP API with a real SAQ worker on Redis and real Postgres; the LLM is the fake
vLLM server (the only double, at the network edge)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
import sqlalchemy as sa

from app.jobs.models import Job
from app.jobs.reconciler import reconcile_once
from app.jobs.repository import JobRepository, LeaseLost
from tests.conftest import label_job, running_worker, wait_for_status


async def test_submit_runs_to_success(app_client, worker, fake_llm):
    # A split of its own: other tests run this job's default body, and their cached answers would make it free.
    response = await app_client.post("/v1/jobs", json=label_job(task={"split": {"seed": 101}}))
    assert response.status_code == 202
    job = await wait_for_status(app_client, response.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["stop_reason"] == "completed"
    assert job["progress"] == {
        "step": 2,
        "total_steps": 2,
        "fraction": 1.0,
        "phase": "finished",
        "phase_step": None,
        "phase_done": None,
        "phase_total": None,
    }
    assert job["attempts"] == 1
    for key in ("initial", "best"):
        assert job[key]["dev_score"] is not None and job[key]["test_score"] is not None
    assert job["best"]["dev_score"] >= job["initial"]["dev_score"]
    assert job["initial"]["prompt"] == "Decide whether the hypothesis follows from the premise."

    # Usage is exact: every request the fake server answered is one charged call.
    assert job["usage"]["llm_calls"] == fake_llm.count(("chat", "completions"))
    assert job["usage"]["prompt_tokens"] > 0

    candidates = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=score")).json()["items"]
    assert candidates, "every evaluated candidate is listed"
    assert candidates == sorted(candidates, key=lambda c: -c["score"])
    assert {c["step"] for c in candidates} <= {0, 1, 2}
    assert any(c["test_score"] is not None for c in candidates)

    page = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step&limit=2")).json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = (await app_client.get(f"/v1/jobs/{job['id']}/candidates?order=step&cursor={page['next_cursor']}")).json()
    assert len(page["items"]) + len(rest["items"]) == len(candidates)


async def test_events_stream_resumes_with_last_event_id(app_client, worker):
    job_id = (await app_client.post("/v1/jobs", json=label_job())).json()["id"]
    await wait_for_status(app_client, job_id, {"succeeded"})

    async def read_events(headers=None) -> list[tuple[int, str, dict]]:
        events = []
        async with app_client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers or {}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            block: dict = {}
            async for line in response.aiter_lines():
                if not line:
                    if block:
                        events.append((int(block["id"]), block["event"], json.loads(block["data"])))
                    block = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    block[field] = value
        return events

    events = await read_events()
    kinds = [kind for _, kind, _ in events]
    assert kinds[0] == "state" and events[0][2]["status"] == "queued"
    assert kinds.count("step") == 3  # the initial prompt, then two search steps
    assert events[-1][2]["status"] == "succeeded"
    resumed = await read_events({"Last-Event-ID": str(events[2][0])})
    assert resumed == events[3:]


async def test_progress_covers_every_phase_and_logs_each_step(app_client, worker, fake_llm, caplog):
    """The initial scoring, each step and the final test scoring show as phases with answers done of expected, in
    the job's progress and as SSE `progress` events; the worker logs each step and the end once."""
    caplog.set_level(logging.INFO, logger="workers.runner")
    caplog.set_level(logging.INFO, logger="app.jobs.router")
    # Every phase lasts longer than the event stream's poll (0.5 s), the shortest (test) one round of requests.
    fake_llm.latency_s = 0.8
    # A prompt and split of its own: answers cached by other tests would make phases instant.
    body = label_job(
        task={"split": {"seed": 202}},
        params={"train_subset": 16},
        initial_prompt="Progress test: does the hypothesis follow from the premise?",
    )
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    streamed: list[dict] = []

    async def read_progress_events() -> None:
        async with app_client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            block: dict = {}
            async for line in response.aiter_lines():
                if not line:
                    if block.get("event") == "progress":
                        assert "id" not in block  # not stored: a resumed stream skips nothing
                        streamed.append(json.loads(block["data"]))
                    block = {}
                elif not line.startswith(":"):
                    field, _, value = line.partition(": ")
                    block[field] = value

    reader = asyncio.create_task(read_progress_events())
    polled = []
    while (job := (await app_client.get(f"/v1/jobs/{job_id}")).json())["status"] in {"queued", "running"}:
        polled.append(job["progress"])
        await asyncio.sleep(0.1)
    await asyncio.wait_for(reader, 10)
    assert job["status"] == "succeeded", job

    for seen in (polled, streamed):
        phases = [(p["phase"], p["phase_step"]) for p in seen if p["phase"] not in {"queued", "finished"}]
        assert ("initial", 0) in phases and ("search", 1) in phases and ("search", 2) in phases, phases
        assert ("test", 2) in phases, phases
        fractions = [p["fraction"] for p in seen if p["phase"] != "queued"]
        assert fractions == sorted(fractions), "overall progress never goes back"
    n_dev = n_test = job["initial"]["test_n"]  # the default split's dev and test are the same size
    distinct = 1 if job["best"]["prompt"] == job["initial"]["prompt"] else 2
    # (An attempt shows its phase without counts until the worker first writes it.)
    running = [p for p in polled + streamed if p["phase"] in {"initial", "search", "test"} and p["phase_total"]]
    assert {p["phase_total"] for p in running if p["phase"] == "initial"} == {16 + n_dev}, running
    assert {p["phase_total"] for p in running if p["phase"] == "test"} == {distinct * n_test}
    assert all(0 <= p["phase_done"] <= p["phase_total"] for p in running if p["phase"] != "search")

    messages = [r.getMessage() for r in caplog.records if job_id in r.getMessage()]
    for step in (0, 1, 2):
        assert sum(f"step {step}/2 saved" in m for m in messages) == 1, messages
    assert sum("queued (opro on builtin:snli16" in m for m in messages) == 1, messages
    assert sum("attempt 1 starts" in m for m in messages) == 1, messages
    assert sum("succeeded (completed)" in m for m in messages) == 1, messages
    assert sum("scoring the initial and best prompts on test" in m for m in messages) == 1, messages

    gain = job["best"]["test_gain"]
    assert gain["n"] == n_test and gain["low"] <= gain["difference"] <= gain["high"]
    assert gain["difference"] == pytest.approx(job["best"]["test_score"] - job["initial"]["test_score"])
    assert gain["wins"] + gain["losses"] + gain["ties"] == n_test


async def test_budget_stop_never_exceeds_cap(app_client, worker, fake_llm):
    cap = 150
    body = label_job(params={"steps": 50, "candidates_per_step": 4}, budget={"max_llm_calls": cap})
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    job = await wait_for_status(app_client, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["stop_reason"] == "budget", job
    assert 0 < job["usage"]["llm_calls"] <= cap
    assert fake_llm.count(("chat", "completions")) == job["usage"]["llm_calls"]
    assert job["best"]["prompt"] and job["best"]["test_score"] is not None  # best so far, scored on test


async def test_token_budget(app_client, worker):
    body = label_job(params={"steps": 50}, budget={"max_llm_calls": None, "max_tokens": 30_000})
    job = await wait_for_status(app_client, (await app_client.post("/v1/jobs", json=body)).json()["id"], {"succeeded"})
    assert job["stop_reason"] == "budget"
    assert job["usage"]["prompt_tokens"] + job["usage"]["completion_tokens"] <= 30_000


async def test_cancel_while_running_keeps_results(app_client, worker, fake_llm):
    fake_llm.latency_s = 0.05
    body = label_job(params={"steps": 200, "candidates_per_step": 4})
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    deadline = time.monotonic() + 60
    while (await app_client.get(f"/v1/jobs/{job_id}")).json()["progress"]["step"] < 1:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    cancelled_at = time.monotonic()
    response = await app_client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 200
    job = await wait_for_status(app_client, job_id, {"cancelled", "succeeded", "failed"}, wait_s=10)
    took = time.monotonic() - cancelled_at
    assert job["status"] == "cancelled" and job["stop_reason"] == "cancelled"
    assert took < 3.0, f"cancel took {took:.1f}s"
    assert job["best"] is not None
    candidates = (await app_client.get(f"/v1/jobs/{job_id}/candidates")).json()["items"]
    assert len(candidates) >= 2
    # No calls after the cancel landed (allow the requests already in flight).
    calls_then = fake_llm.count()
    await asyncio.sleep(1.0)
    assert fake_llm.count() == calls_then
    again = await app_client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.json()["status"] == "cancelled"  # idempotent


async def test_cancel_queued_job_is_immediate(app_client):
    job_id = (await app_client.post("/v1/jobs", json=label_job())).json()["id"]
    job = (await app_client.post(f"/v1/jobs/{job_id}/cancel")).json()
    assert job["status"] == "cancelled"


async def test_redis_loss_reconciler_restores_jobs(app_client, settings, redis_client):
    ids = [(await app_client.post("/v1/jobs", json=label_job(seed=s))).json()["id"] for s in (11, 12)]
    # Redis loses everything this test session's queue had (its own keys only: the server is shared).
    name = settings.queue.name
    lost = []
    for pattern in (f"saq:{name}:*", f"saq:job:{name}:*"):
        lost += [key async for key in redis_client.scan_iter(pattern)]
    assert lost
    await redis_client.delete(*lost)
    async with running_worker(settings):
        for job_id in ids:
            job = await wait_for_status(app_client, job_id, {"succeeded", "failed"})
            assert job["status"] == "succeeded"


async def test_reconciler_enqueues_committed_but_unqueued(settings, db, app_client):
    """Crash between commit and enqueue: the job row exists, no message was ever sent."""
    from app.datasets.repository import DatasetRepository
    from app.jobs import service
    from app.jobs.schemas import job_create_adapter
    from app.queue import SaqJobQueue

    payload = job_create_adapter().validate_python(label_job())
    async with db.transaction() as session:
        job, _ = await service.submit_job(
            payload,
            jobs=JobRepository(session),
            datasets=DatasetRepository(session),
            registry=app_client.app.state.services.registry,
            tenant="default",
            webhooks=settings.webhooks,
        )
    queue = SaqJobQueue(settings.redis_url, settings.queue)
    try:
        await asyncio.sleep(settings.queue.reconcile_seconds + 0.1)
        assert job.id in await reconcile_once(db, queue, queued_grace_seconds=0.5)
        # A job whose message is still there is left alone.
        assert job.id not in await reconcile_once(db, queue, queued_grace_seconds=0.5)
    finally:
        await queue.aclose()
    async with running_worker(settings):
        assert (await wait_for_status(app_client, job.id, {"succeeded"}))["status"] == "succeeded"


async def test_stale_attempt_is_fenced(app_client, db):
    job_id = (await app_client.post("/v1/jobs", json=label_job())).json()["id"]
    await app_client.post(f"/v1/jobs/{job_id}/cancel")  # keep workers away from it
    async with db.transaction() as session:
        await session.execute(sa.update(Job).where(Job.id == job_id).values(status="queued", cancel_requested=False))
    async with db.transaction() as session:
        first = await JobRepository(session).acquire_lease(job_id, worker_id="a", lease_seconds=0.01)
    assert first.attempts == 1
    await asyncio.sleep(0.05)
    async with db.transaction() as session:
        second = await JobRepository(session).acquire_lease(job_id, worker_id="b", lease_seconds=60)
    assert second.attempts == 2
    async with db.transaction() as session:
        # A live lease cannot be taken.
        assert await JobRepository(session).acquire_lease(job_id, worker_id="c", lease_seconds=60) is None
    for write in (
        lambda repo: repo.heartbeat(job_id, 1, 60),
        lambda repo: repo.save_step(
            job_id,
            1,
            step=1,
            total_steps=2,
            candidates=[],
            state={},
            initial=None,
            best=None,
            elapsed_seconds=0,
            event={},
        ),
    ):
        try:
            async with db.transaction() as session:
                await write(JobRepository(session))
            raise AssertionError("a stale attempt's write went through")
        except LeaseLost:
            pass
    async with db.transaction() as session:
        await JobRepository(session).heartbeat(job_id, 2, 60)  # the current attempt may write
        await session.execute(sa.update(Job).where(Job.id == job_id).values(status="cancelled"))


async def test_time_budget_stops_the_search(app_client, worker, fake_llm):
    fake_llm.latency_s = 0.02
    body = label_job(params={"steps": 500}, budget={"max_seconds": 1.5}, initial_prompt="Time-boxed run.")
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    job = await wait_for_status(app_client, job_id, {"succeeded", "failed"}, wait_s=30)
    assert job["status"] == "succeeded" and job["stop_reason"] == "budget"
    assert job["progress"]["step"] < 500
    assert job["best"]["test_score"] is not None


async def test_reconciler_reenqueues_a_dead_lease_once(app_client, settings, db):
    """A running job whose worker died gets one new message, not one per reconciler pass."""
    from datetime import timedelta

    from app.db import utcnow
    from app.queue import SaqJobQueue

    job_id = (await app_client.post("/v1/jobs", json=label_job(seed=99))).json()["id"]
    async with db.transaction() as session:
        await session.execute(
            sa.update(Job)
            .where(Job.id == job_id)
            # Its worker died and the message it held is gone.
            .values(status="running", attempts=1, lease_expires_at=utcnow() - timedelta(seconds=5), queue_key="gone")
        )
    queue = SaqJobQueue(settings.redis_url, settings.queue)
    try:
        assert job_id in await reconcile_once(db, queue, queued_grace_seconds=0.5)
        assert job_id not in await reconcile_once(db, queue, queued_grace_seconds=0.5)
    finally:
        await queue.aclose()
    async with running_worker(settings):
        job = await wait_for_status(app_client, job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["attempts"] == 2
