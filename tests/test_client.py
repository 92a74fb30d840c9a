"""The Python client against a running server: every endpoint, typed errors, SSE resumed after a dropped
connection, and the sync client."""

from __future__ import annotations

import asyncio
import json

import pytest

from promptopt_client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    ConnectionFailed,
    NotFound,
    Unauthorized,
)
from tests.conftest import free_port, label_job, served
from tests.fakes.fault_proxy import FaultProxy
from tests.test_studies import study_body


async def test_every_endpoint(settings, worker, tmp_path):
    async with served(settings) as url, AsyncClient(url) as client:
        assert await client.ready()
        assert {m.name for m in await client.methods()} >= {"opro", "apo", "evaluate"}
        assert "default" in {b.name for b in await client.backends()}

        dataset = await client.create_dataset("snli-part", [{"input": f"i{n}", "target": "t"} for n in range(4)])
        assert dataset.n_examples == 4 and dataset.tenant == "default"
        upload = tmp_path / "part.jsonl"
        upload.write_text("\n".join(json.dumps({"input": f"u{n}", "target": "t"}) for n in range(3)))
        uploaded = await client.upload_dataset(upload)
        assert uploaded.name == "part" and uploaded.n_examples == 3
        assert (await client.get_dataset(dataset.id, examples_limit=2)).examples[1].input == "i1"
        assert {d.id for d in (await client.list_datasets()).items} >= {dataset.id, uploaded.id}
        assert "builtin:snli16" in {d.id for d in (await client.list_datasets(source="builtin")).items}

        submitted = await client.submit_job(label_job())
        job = await client.wait(submitted.id, timeout=60, poll_s=0.1)
        assert job.status == "succeeded" and job.best is not None and job.best.test_n
        assert submitted.id in {j.id for j in (await client.list_jobs(limit=200)).items}
        assert submitted.id in {j.id async for j in client.iter_jobs(status="succeeded")}
        candidates = await client.candidates(job.id, order="score")
        assert candidates.items and candidates.items[0].score >= candidates.items[-1].score
        predicted = await client.predict(job.id, ["A man sleeps. A man is awake."])
        assert predicted.predictions[0].output in {"entailment", "neutral", "contradiction"}
        with pytest.raises(NotFound):
            await client.artifact(job.id)  # a text prompt has no artifact
        assert (await client.cancel_job(job.id)).status == "succeeded"  # idempotent on an ended job

        events = [e async for e in client.events(job.id)]
        assert events[0].event == "state" and events[-1].event == "state"
        assert events[-1].data["status"] == "succeeded" and any(e.event == "step" for e in events)
        later = [e async for e in client.events(job.id, last_event_id=events[2].id)]
        assert [e.id for e in later] == [e.id for e in events[3:]]

        study = await client.create_study(study_body(seeds=[0]))
        assert (await client.get_study(study.id)).leaderboard is not None
        assert study.id in {s.id for s in (await client.list_studies()).items}
        assert (await client.cancel_study(study.id)).status in {"cancelled", "running", "completed"}


async def test_typed_errors_carry_the_api_body(settings):
    keyed = settings.model_copy(update={"api_keys": ["t:secret"]})
    async with served(keyed) as url:
        async with AsyncClient(url, api_key="secret") as client:
            with pytest.raises(NotFound) as missing:
                await client.get_job("nope")
            assert missing.value.status == 404 and missing.value.code == "not_found"
            with pytest.raises(BadRequest) as invalid:
                await client.submit_job(label_job(params={"steps": -1}))
            assert invalid.value.status == 422 and invalid.value.details[0]["loc"] == ["body", "params", "steps"]
            body = {"name": "d", "examples": [{"input": "a", "target": "b"}]}
            await client.create_dataset("d", body["examples"], idempotency_key="k1")
            with pytest.raises(Conflict):
                await client.create_dataset("other", body["examples"], idempotency_key="k1")
        async with AsyncClient(url, api_key="wrong") as client:
            with pytest.raises(Unauthorized) as refused:
                await client.list_jobs()
            assert refused.value.code == "unauthorized"
    async with AsyncClient(f"http://127.0.0.1:{free_port()}") as client:
        with pytest.raises(ConnectionFailed):
            await client.list_jobs()


async def test_event_stream_resumes_after_a_dropped_connection(settings, worker, fake_llm):
    async with served(settings) as url:
        port = int(url.rsplit(":", 1)[1])
        with FaultProxy("127.0.0.1", port) as proxy:
            async with AsyncClient(f"http://127.0.0.1:{proxy.port}") as client:
                fake_llm.hold_after(30)
                job = await client.submit_job(label_job(initial_prompt="Relate the sentences (resume test)."))
                seen = []
                stream = client.events(job.id)
                seen.append(await stream.__anext__())  # queued
                await fake_llm.wait_held(1, wait_s=60)
                proxy.reset_all()  # the connection drops mid-stream
                fake_llm.release()
                async for event in stream:
                    seen.append(event)
                direct = [e async for e in client.events(job.id)]
    # Stored events: nothing lost, nothing twice. Progress events (no id) came only while the job ran.
    assert [e.id for e in seen if e.id is not None] == [e.id for e in direct]
    assert any(e.event == "progress" and e.id is None for e in seen)
    assert not any(e.event == "progress" for e in direct)
    assert seen[-1].data["status"] == "succeeded"


def use_sync_client(url: str) -> None:
    with Client(url) as client:
        job = client.submit_job(label_job())
        done = client.wait(job.id, timeout=60, poll_s=0.1)
        assert done.status == "succeeded"
        kinds = [event.event for event in client.events(job.id)]
        assert kinds[0] == "state" and "step" in kinds
        with pytest.raises(NotFound):
            client.get_job("nope")


async def test_sync_client(settings, worker):
    async with served(settings) as url:
        # The sync client runs its own event loop: in a thread, while this loop serves it.
        await asyncio.to_thread(use_sync_client, url)
