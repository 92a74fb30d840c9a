"""The Prometheus series an operator alerts on move when they should: read from GET /metrics before and after.

Series are process-global (the in-process worker shares the API's registry) and other tests move them too, so
every check is on a delta."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import app.metrics
from app.llm.breaker import CircuitBreaker
from app.llm.metered import MeteredLLM
from app.llm.port import BackendInfo, BackendUnavailable, Capability, LabelScoreRequest, LabelScores
from app.usage import Budget, Usage
from tests.conftest import label_job, wait_for_status

LLM_KINDS = ("chat", "completions")
JOB_ROUTE = "/v1/jobs/{job_id}"


class Scrape:
    """One read of /metrics: sample values by (name, labels)."""

    def __init__(self, text: str) -> None:
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(labels)[label] for n, labels in self.samples if n == name and label in dict(labels)}


async def scrape(client) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return Scrape(response.text)


@pytest.fixture(autouse=True)
def _fresh_job_gauges(monkeypatch):
    """Every scrape reads the database (in service the job gauges are cached for a few seconds)."""
    monkeypatch.setattr(app.metrics, "JOB_GAUGES_TTL_S", 0.0)


async def test_request_latency_by_route_template_and_queue_depth(app_client):
    before = await scrape(app_client)
    job_id = (await app_client.post("/v1/jobs", json=label_job())).json()["id"]  # no worker: it stays queued
    assert (await app_client.get(f"/v1/jobs/{job_id}")).status_code == 200
    missing = str(uuid.uuid4())
    assert (await app_client.get(f"/v1/jobs/{missing}")).status_code == 404
    assert (await app_client.get(f"/no/such/path/{missing}")).status_code == 404
    after = await scrape(app_client)

    count = "promptopt_http_request_seconds_count"
    for status in ("200", "404"):
        labels = {"route": JOB_ROUTE, "method": "GET", "status": status}
        assert after(count, **labels) - before(count, **labels) == 1
    labels = {"route": "/v1/jobs", "method": "POST", "status": "202"}
    assert after(count, **labels) - before(count, **labels) == 1
    labels = {"route": "unmatched", "method": "GET", "status": "404"}
    assert after(count, **labels) - before(count, **labels) == 1
    # Bounded cardinality: templates only, never a raw id.
    routes = after.label_values(count, "route")
    assert not any(job_id in r or missing in r for r in routes), routes
    assert after.has("promptopt_http_request_seconds_bucket", route=JOB_ROUTE, method="GET", status="200", le="+Inf")

    # The queued job: in the jobs gauge, the database's queue depth and SAQ's queue.
    assert (
        after("promptopt_jobs", status="queued", method="opro")
        - before("promptopt_jobs", status="queued", method="opro")
        == 1
    )
    assert after("promptopt_queue_depth") - before("promptopt_queue_depth") == 1
    assert after("promptopt_queue_messages", state="queued") - before("promptopt_queue_messages", state="queued") == 1
    # Every known status and method is reported, with 0 where there is none.
    assert after.has("promptopt_jobs", status="running", method="bbtv2")


async def test_a_job_moves_llm_calls_tokens_cache_hits_job_gauges_and_duration(app_client, worker, tmp_path):
    body = label_job(initial_prompt=f"Relate the two sentences ({tmp_path.name}).")  # new to the cache
    before = await scrape(app_client)
    first = await wait_for_status(
        app_client, (await app_client.post("/v1/jobs", json=body)).json()["id"], {"succeeded", "failed"}
    )
    middle = await scrape(app_client)
    assert first["status"] == "succeeded", first
    usage = first["usage"]
    assert usage["llm_calls"] > 0

    def moved(name: str, a: Scrape, b: Scrape, **labels: str) -> float:
        return b(name, **labels) - a(name, **labels)

    # Every charged call and token, under the backend's configured name.
    assert moved("promptopt_llm_calls_total", before, middle, backend="default") == usage["llm_calls"]
    assert (
        moved("promptopt_llm_tokens_total", before, middle, backend="default", type="prompt") == usage["prompt_tokens"]
    )
    assert (
        moved("promptopt_llm_tokens_total", before, middle, backend="default", type="completion")
        == usage["completion_tokens"]
    )
    assert moved("promptopt_jobs", before, middle, status="succeeded", method="opro") == 1
    assert moved("promptopt_job_duration_seconds_count", before, middle, method="opro", status="succeeded") == 1
    assert moved("promptopt_job_duration_seconds_sum", before, middle, method="opro", status="succeeded") > 0
    assert moved("promptopt_job_attempts_total", before, middle, resumed="false") == 1

    # The same job again: answered from the cache.
    second = await wait_for_status(
        app_client, (await app_client.post("/v1/jobs", json=body)).json()["id"], {"succeeded", "failed"}
    )
    after = await scrape(app_client)
    assert second["status"] == "succeeded", second
    assert second["usage"]["cache_hits"] > 0
    assert moved("promptopt_llm_cache_hits_total", middle, after, backend="default") == second["usage"]["cache_hits"]
    assert moved("promptopt_llm_calls_total", middle, after, backend="default") == second["usage"]["llm_calls"]
    assert moved("promptopt_jobs", middle, after, status="succeeded", method="opro") == 1
    assert moved("promptopt_job_duration_seconds_count", middle, after, method="opro", status="succeeded") == 1


async def test_a_permanent_backend_error_is_counted_and_the_failed_job_timed(app_client, worker, fake_llm, tmp_path):
    fake_llm.fail_next(1000, status=400, kinds=LLM_KINDS)
    before = await scrape(app_client)
    body = label_job(initial_prompt=f"Relate the sentences ({tmp_path.name}).")
    job = await wait_for_status(app_client, (await app_client.post("/v1/jobs", json=body)).json()["id"], {"failed"})
    after = await scrape(app_client)
    assert job["error"].startswith("backend_error: default:")
    errors = {"backend": "default", "kind": "permanent"}
    assert after("promptopt_llm_errors_total", **errors) - before("promptopt_llm_errors_total", **errors) >= 1
    duration = {"method": "opro", "status": "failed"}
    assert (
        after("promptopt_job_duration_seconds_count", **duration)
        - before("promptopt_job_duration_seconds_count", **duration)
        == 1
    )
    assert (
        after("promptopt_jobs", status="failed", method="opro")
        - before("promptopt_jobs", status="failed", method="opro")
        == 1
    )


class FlakyScorer:
    """Answers the first 3 requests of its first call, then fails as a restarting server would; then answers."""

    name = "flaky-metrics"

    def __init__(self) -> None:
        self.calls = 0
        self.info = BackendInfo(self.name, "scripted", "flaky-model", frozenset({Capability.LABEL_LOGPROBS}))

    def count_tokens_upper_bound(self, text: str) -> int:
        return len(text) + 1

    async def health(self) -> None:
        return None

    async def label_logprobs(self, requests, on_result=None):
        self.calls += 1
        out = []
        for i, _ in enumerate(requests):
            if self.calls == 1 and i >= 3:
                raise BackendUnavailable("flaky: connection reset")
            scores = LabelScores([-0.1, -2.0], prompt_tokens=3)
            on_result(i, scores)
            out.append(scores)
        return out


async def test_a_transient_backend_error_is_counted_by_backend_and_kind():
    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    scorer = FlakyScorer()
    breaker = CircuitBreaker(scorer.name, scorer.health, probe_interval=0.01)
    llm = MeteredLLM(scorer, usage=Usage(), budget=Budget(), store=None, breaker=breaker)
    transient = {"backend": scorer.name, "kind": "transient"}
    errors, calls = (
        value("promptopt_llm_errors_total", **transient),
        value("promptopt_llm_calls_total", backend=scorer.name),
    )
    try:
        await llm.label_logprobs([LabelScoreRequest(f"prompt {i}", ("yes", "no")) for i in range(8)])
        # Repeated: answered by the in-process cache.
        hits = value("promptopt_llm_cache_hits_total", backend=scorer.name)
        await llm.label_logprobs([LabelScoreRequest(f"prompt {i}", ("yes", "no")) for i in range(8)])
    finally:
        await breaker.aclose()
    assert value("promptopt_llm_errors_total", **transient) - errors == 1
    assert value("promptopt_llm_calls_total", backend=scorer.name) - calls == 8
    assert value("promptopt_llm_tokens_total", backend=scorer.name, type="prompt") >= 24
    assert value("promptopt_llm_cache_hits_total", backend=scorer.name) - hits == 8
    assert value("promptopt_backend_trips_total", backend=scorer.name) >= 1
