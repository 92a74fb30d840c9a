"""kill -9 of a worker process mid-job: a second worker process resumes from the last checkpoint, no LLM
call that had completed is made again (counted at the LLM boundary, the fake vLLM server), and the
resumed job ends where an uninterrupted one does."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from app.cache.models import EvalCacheEntry
from tests.conftest import label_job, running_worker, settings_env, wait_for_status

ROOT = Path(__file__).resolve().parent.parent


def start_worker(settings, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings), "PROMPTOPT_LOG_LEVEL": "INFO"}
    log = log_path.open("w")
    return subprocess.Popen([sys.executable, "-m", "workers"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def call_keys(entry) -> list[str]:
    """One key per LLM call of a logged request: a completions request with a prompt list holds several."""
    prompts = entry.body.get("prompt")
    if entry.kind == "completions" and isinstance(prompts, list):
        return [entry.kind + json.dumps({**entry.body, "prompt": p}, sort_keys=True) for p in prompts]
    return [entry.kind + json.dumps(entry.body, sort_keys=True)]


@dataclass
class CrashRun:
    job: dict
    completed_before_kill: set[str]
    requests_after_kill: list


async def run_with_kill(app_client, settings, fake_llm, tmp_path, body: dict, hold_after: int) -> CrashRun:
    """Submit `body`; a worker process runs it until `hold_after` LLM calls have passed, is killed with
    SIGKILL while further calls hang, and a second worker process finishes the job."""
    fake_llm.hold_after(hold_after)
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    first = start_worker(settings, tmp_path / "worker-a.log")
    second = None
    try:
        await fake_llm.wait_held(1, wait_s=60)
        await asyncio.sleep(1.0)  # answers already received are written to the evaluation cache
        mid = (await app_client.get(f"/v1/jobs/{job_id}")).json()
        assert mid["status"] == "running" and mid["initial"] is not None, mid  # step 0 is checkpointed
        first.send_signal(signal.SIGKILL)
        first.wait(10)

        completed_before = {key for e in fake_llm.completed_requests() for key in call_keys(e)}
        logged_before = len(fake_llm.requests())
        fake_llm.release()  # the dead worker's held requests are answered to nobody
        await asyncio.sleep(0.3)

        second = start_worker(settings, tmp_path / "worker-b.log")
        job = await wait_for_status(app_client, job_id, {"succeeded", "failed"}, wait_s=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("worker-*.log")))
    assert job["status"] == "succeeded", (job, logs[-5000:])
    return CrashRun(job, completed_before, fake_llm.requests()[logged_before:])


async def test_kill9_worker_second_worker_finishes_without_repeating_calls(app_client, settings, fake_llm, tmp_path):
    # A prompt no other test used, so nothing is in the evaluation cache yet.
    body = label_job(params={"steps": 3, "candidates_per_step": 3}, initial_prompt=f"Judge the pair. {tmp_path.name}")
    run = await run_with_kill(app_client, settings, fake_llm, tmp_path, body, hold_after=80)
    job = run.job
    assert job["attempts"] == 2
    assert job["progress"]["step"] == 3
    repeated = [k for e in run.requests_after_kill for k in call_keys(e) if k in run.completed_before_kill]
    assert not repeated, f"{len(repeated)} completed calls were made again"
    # Every answered call was charged once: the first attempt's before the kill, then the second's.
    answered_after = sum(e.prompts for e in run.requests_after_kill if e.completed)
    assert job["usage"]["llm_calls"] == len(run.completed_before_kill) + answered_after


async def test_apo_resumed_after_kill_ends_like_uninterrupted(app_client, settings, fake_llm, db, tmp_path):
    """APO on a deterministic backend with the same seed: killed mid-round and resumed, it ends with the
    same beam winner and scores as an uninterrupted run - with the evaluation cache emptied in between,
    so the resumed run cannot simply copy the first one's answers."""
    body = label_job(method="apo", initial_prompt=f"Judge the pair. {tmp_path.name}", seed=7)
    body["params"] = {"preset": "small", "rounds": 3}

    async with running_worker(settings):
        job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
        reference = await wait_for_status(app_client, job_id, {"succeeded", "failed"}, wait_s=120)
    assert reference["status"] == "succeeded" and reference["attempts"] == 1
    calls = reference["usage"]["llm_calls"]
    assert calls > 100, calls

    async with db.transaction() as session:
        await session.execute(sa.delete(EvalCacheEntry))
    fake_llm.reset()
    run = await run_with_kill(app_client, settings, fake_llm, tmp_path, body, hold_after=calls // 2)
    resumed = run.job
    assert resumed["attempts"] == 2
    assert resumed["best"] == reference["best"]
    assert resumed["initial"] == reference["initial"]
    assert resumed["usage"]["llm_calls"] == calls  # the same calls, each made once across both attempts


async def test_sigterm_hands_the_job_back_and_another_worker_resumes(app_client, settings, fake_llm, db, tmp_path):
    from app.db import utcnow
    from app.jobs.models import Job

    fake_llm.latency_s = 0.2  # a request carries up to 16 prompts: the job must still outlast the SIGTERM
    body = label_job(params={"steps": 4, "candidates_per_step": 3}, initial_prompt=f"Graceful. {tmp_path.name}")
    job_id = (await app_client.post("/v1/jobs", json=body)).json()["id"]
    first = start_worker(settings, tmp_path / "worker-a.log")
    second = None
    try:
        for _ in range(600):
            if (await app_client.get(f"/v1/jobs/{job_id}")).json()["initial"] is not None:
                break
            await asyncio.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0  # a clean exit, not a crash
        async with db.transaction() as session:
            row = await session.get(Job, job_id)
            # Still running (not failed), and its lease was given up rather than left to expire.
            assert row.status == "running" and row.lease_expires_at <= utcnow()
        second = start_worker(settings, tmp_path / "worker-b.log")
        job = await wait_for_status(app_client, job_id, {"succeeded", "failed"}, wait_s=120)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert job["status"] == "succeeded" and job["attempts"] == 2
