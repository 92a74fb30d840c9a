"""kill -9 of a worker process mid-job: a second worker process resumes from the last checkpoint and
no LLM call that had completed is made again (counted at the LLM boundary, the fake vLLM server)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import label_job, settings_env, wait_for_status

ROOT = Path(__file__).resolve().parent.parent


def start_worker(settings, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **settings_env(settings), "PROMPTOPT_LOG_LEVEL": "INFO"}
    log = log_path.open("w")
    return subprocess.Popen([sys.executable, "-m", "workers"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def request_key(entry) -> str:
    return entry.kind + json.dumps(entry.body, sort_keys=True)


async def test_kill9_worker_second_worker_finishes_without_repeating_calls(app_client, settings, fake_llm, tmp_path):
    # Let the job get past its first checkpoint and into the middle of a step, then hold every call.
    fake_llm.hold_after(80)
    # A prompt no other test used, so nothing is in the evaluation cache yet.
    body = label_job(params={"steps": 3, "candidates_per_step": 3}, initial_prompt=f"Judge the pair. {tmp_path.name}")
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

        completed_before = {request_key(e) for e in fake_llm.completed_requests()}
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
    assert job["status"] == "succeeded", (job, logs)
    assert job["attempts"] == 2
    assert job["progress"]["step"] == 3

    after = fake_llm.requests()[logged_before:]
    repeated = [e for e in after if request_key(e) in completed_before]
    assert not repeated, f"{len(repeated)} completed calls were made again"
    # Every answered call was charged once: the first attempt's before the kill, then the second's.
    assert job["usage"]["llm_calls"] == len(completed_before) + sum(1 for e in after if e.completed)
