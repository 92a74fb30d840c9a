"""Webhooks: signed deliveries of a job's end and steps, retried with backoff and logged; the allow-list and the
address rules refuse a destination with a 422 naming the setting."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.settings import WebhookSettings, WebhookTarget
from app.webhooks.destinations import refused_address
from app.webhooks.signing import sign, verify
from promptopt_client import verify_signature
from tests.conftest import label_job, served, serving, wait_for_status

SECRET = "test-webhook-secret"


class Receiver:
    """An HTTP endpoint that records what it is sent and fails the first `fail_first` requests with a 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[dict[str, str], bytes]] = []

    async def hook(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        if len(self.received) <= self.fail_first:
            return Response("try later", status_code=500)
        return Response("ok")


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver):
    app = Starlette(routes=[Route("/hooks/job", receiver.hook, methods=["POST"])])
    async with serving(app) as url:
        yield f"{url}/hooks/"


def with_webhooks(settings, prefix: str, **overrides):
    hooks = WebhookSettings(
        allowed_destinations=[prefix],
        allow_private_addresses=True,  # the receiver is on localhost
        secret=SECRET,
        retry_base_seconds=0.2,
        retry_max_seconds=0.5,
        **overrides,
    )
    return settings.model_copy(update={"webhooks": hooks})


async def test_deliveries_are_signed_retried_and_logged(settings):
    from promptopt_client import AsyncClient
    from tests.conftest import running_worker

    receiver = Receiver(fail_first=2)
    async with receiving(receiver) as prefix:
        hooked = with_webhooks(settings, prefix)
        async with served(hooked) as url, running_worker(hooked), AsyncClient(url) as client:
            body = label_job(webhook={"url": prefix + "job", "events": ["terminal", "step"]})
            job = await client.wait((await client.submit_job(body)).id, timeout=60, poll_s=0.1)
            for _ in range(100):
                deliveries = await client.webhook_deliveries(job.id)
                if deliveries and all(d.status != "pending" for d in deliveries):
                    break
                await asyncio.sleep(0.1)
    events = [d.event for d in deliveries]
    assert events.count("job.step") == job.progress.total_steps + 1 and events[-1] == "job.succeeded"
    assert all(d.status == "delivered" for d in deliveries)
    assert sum(d.attempts for d in deliveries) == len(deliveries) + 2  # the two refused attempts were retried
    assert any(d.last_error is None and d.attempts > 1 for d in deliveries)

    payloads = []
    for headers, raw in receiver.received:
        assert verify_signature(SECRET, raw, headers["promptopt-signature"])
        assert not verify_signature("another secret", raw, headers["promptopt-signature"])
        payloads.append(json.loads(raw))
    final = [p for p in payloads if p["event"] == "job.succeeded"][-1]
    assert final["job_id"] == job.id and final["best"]["prompt"] == job.best.prompt
    assert final["usage"]["llm_calls"] == job.usage.llm_calls


@pytest.mark.parametrize(
    ("hooks", "url", "expected"),
    [
        ({"allowed_destinations": []}, "https://hooks.example.com/x", "webhooks.allowed_destinations"),
        ({"allowed_destinations": ["https://hooks.example.com/"]}, "https://evil.example.org/x", "none"),
        ({"allowed_destinations": ["http://169.254.169.254/"]}, "http://169.254.169.254/latest", "metadata"),
        ({"allowed_destinations": ["http://127.0.0.1:9/"]}, "http://127.0.0.1:9/x", "loopback"),
    ],
)
async def test_refused_destinations_are_a_422_naming_the_setting(app_client, settings, hooks, url, expected):
    import httpx

    from app.main import create_app

    app = create_app(settings.model_copy(update={"webhooks": WebhookSettings(secret=SECRET, **hooks)}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post("/v1/jobs", json=label_job(webhook={"url": url}))
    assert response.status_code == 422, response.text
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == ["body", "webhook", "url"]
    assert expected in detail["msg"] or (expected == "none" and "allowed_destinations" in detail["msg"])


async def test_without_a_secret_webhooks_are_refused(app_client):
    response = await app_client.post("/v1/jobs", json=label_job(webhook={"url": "https://hooks.example.com/x"}))
    assert response.status_code == 422 and "webhooks.secret" in response.json()["error"]["message"]


async def test_a_tenant_default_applies_to_jobs_that_name_none(settings):
    import httpx

    from app.main import create_app

    receiver = Receiver()
    async with receiving(receiver) as prefix:
        hooked = with_webhooks(settings, prefix, tenant_defaults={"default": WebhookTarget(url=prefix + "job")})
        app = create_app(hooked)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                job = (await client.post("/v1/jobs", json=label_job())).json()
                assert job["spec"]["webhook"]["url"] == prefix + "job"
                await client.post(f"/v1/jobs/{job['id']}/cancel")  # a queued job ends at once: one delivery
                await wait_for_status(client, job["id"], {"cancelled"})
                deliveries = (await client.get(f"/v1/jobs/{job['id']}/webhooks")).json()
    assert [d["event"] for d in deliveries] == ["job.cancelled"]


def test_signatures_and_addresses():
    body = b'{"a":1}'
    header = sign("s", body, timestamp=1_000)
    assert verify("s", body, header, now=1_100)
    assert not verify("s", body + b" ", header, now=1_100)
    assert not verify("s", body, header, now=1_000 + 301)  # too old: a replay
    assert not verify("s", body, "garbage")
    assert refused_address("169.254.169.254") == "a cloud metadata address"
    assert refused_address("fe80::1") == "a link-local address"
    assert refused_address("10.0.0.5") == "a private or reserved address"
    assert refused_address("::1") == "a loopback address"
    assert refused_address("93.184.216.34") is None
