"""The evaluation cache is per tenant by default: tenant b's copy of tenant a's job pays for its own answers and
learns nothing of a's; with `cache_scope: shared` the same copy is answered from the cache."""

from __future__ import annotations

import httpx
import pytest

from app.llm.metered import cache_key
from app.llm.port import LabelScoreRequest
from app.main import create_app
from tests.conftest import label_job, running_worker, wait_for_status


def test_scoped_keys_differ_and_shared_keys_stay_as_they_were():
    request = LabelScoreRequest("p", (" a", " b"))
    assert cache_key("m", "label_logprobs", request, "a") != cache_key("m", "label_logprobs", request, "b")
    assert cache_key("m", "label_logprobs", request, None) == cache_key("m", "label_logprobs", request)


@pytest.mark.parametrize(("scope", "b_pays"), [("tenant", True), ("shared", False)])
async def test_one_tenant_never_gets_another_tenants_answers(settings, fake_llm, tmp_path, scope, b_pays):
    keyed = settings.model_copy(update={"api_keys": ["team-a:key-a", "team-b:key-b"], "cache_scope": scope})
    app = create_app(keyed)
    body = label_job(initial_prompt=f"Relate the sentences ({scope} {tmp_path.name}).")
    jobs = {}
    async with app.router.lifespan_context(app), running_worker(keyed):
        transport = httpx.ASGITransport(app=app)
        for tenant in ("a", "b"):
            headers = {"Authorization": f"Bearer key-{tenant}"}
            async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=headers) as client:
                created = await client.post("/v1/jobs", json=body)
                assert created.status_code == 202, created.text
                jobs[tenant] = await wait_for_status(client, created.json()["id"], {"succeeded", "failed"}, 120)
    a, b = jobs["a"], jobs["b"]
    assert a["status"] == b["status"] == "succeeded"
    assert a["usage"]["llm_calls"] > 0
    if b_pays:
        assert (
            b["usage"]["llm_calls"] == a["usage"]["llm_calls"] and b["usage"]["cache_hits"] == a["usage"]["cache_hits"]
        )
    else:
        assert b["usage"]["llm_calls"] == 0 and b["usage"]["cache_hits"] > 0
