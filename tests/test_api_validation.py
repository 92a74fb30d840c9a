"""Bad input gets a 422 naming the field and what is allowed; unknown ids get 404; nothing accepted is lost."""

from __future__ import annotations

import json

import pytest

from tests.conftest import label_job


def details(response) -> list[dict]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "details"} <= set(body["error"])
    return body["error"]["details"]


def locs(response) -> list[str]:
    return [".".join(d["loc"]) for d in details(response)]


async def test_unknown_method_lists_allowed(app_client):
    response = await app_client.post("/v1/jobs", json=label_job(method="nope"))
    assert response.status_code == 422
    assert "body.method" in locs(response)
    assert any("opro" in str(d.get("allowed", "")) + d["msg"] for d in details(response))


async def test_missing_method_is_named(app_client):
    body = label_job()
    del body["method"]
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert locs(response) == ["body.method"]


@pytest.mark.parametrize(
    ("patch", "loc"),
    [
        ({"task": {"dataset": "builtin:snli16", "metric": "bleu"}}, "body.task.metric"),
        ({"task": {"dataset": "builtin:snli16", "template": "no slots"}}, "body.task.template"),
        ({"task": {"dataset": "builtin:snli16", "bogus": 1}}, "body.task.bogus"),
        ({"params": {"steps": -1}}, "body.params.steps"),
        ({"params": {"candidates_per_step": 0}}, "body.params.candidates_per_step"),
        ({"params": {"unknown_knob": 3}}, "body.params.unknown_knob"),
        ({"budget": {"max_llm_calls": 0}}, "body.budget.max_llm_calls"),
        ({"extra_top_level": True}, "body.extra_top_level"),
        ({"task": {"dataset": "builtin:snli16", "split": {"train": 0}}}, "body.task.split.train"),
    ],
)
async def test_malformed_job_names_field(app_client, patch, loc):
    body = label_job()
    body.update(patch)
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert loc in locs(response)


async def test_bounds_are_reported(app_client):
    response = await app_client.post("/v1/jobs", json=label_job(params={"steps": 10**9}))
    assert response.status_code == 422
    (detail,) = [d for d in details(response) if d["loc"][-1] == "steps"]
    assert detail["le"] == 10_000


async def test_unknown_preset_lists_allowed(app_client):
    response = await app_client.post("/v1/jobs", json=label_job(params={"preset": "huge"}))
    assert response.status_code == 422
    assert "small" in response.json()["error"]["message"]


async def test_unknown_dataset_and_backend(app_client):
    response = await app_client.post("/v1/jobs", json=label_job(task={"dataset": "builtin:nope"}))
    assert response.status_code == 422
    assert locs(response) == ["body.task.dataset"]

    response = await app_client.post("/v1/jobs", json=label_job(backends={"scorer": "gpu-farm"}))
    assert response.status_code == 422
    assert locs(response) == ["body.backends.scorer"]
    assert set(details(response)[0]["allowed"]) == {"default", "local"}


async def test_label_metric_needs_labels_covering_targets(app_client):
    response = await app_client.post(
        "/v1/jobs", json=label_job(task={"dataset": "builtin:snli16", "labels": ["entailment", "neutral"]})
    )
    assert response.status_code == 422
    assert locs(response) == ["body.task.labels"]
    assert "contradiction" in details(response)[0]["msg"]


async def test_verbalizer_keys_must_be_labels(app_client):
    task = {"dataset": "builtin:snli16", "labels": ["a", "b"], "verbalizer": {"c": " C"}}
    response = await app_client.post("/v1/jobs", json=label_job(task=task))
    assert response.status_code == 422
    assert "body.task" in locs(response)


async def test_verbalizer_words_may_be_lists(app_client):
    labels = ["entailment", "neutral", "contradiction"]
    task = {"dataset": "builtin:snli16", "labels": labels, "verbalizer": {"entailment": [" Yes", " True"]}}
    response = await app_client.post("/v1/jobs", json=label_job(task=task))
    assert response.status_code == 202, response.text
    stored = (await app_client.get(f"/v1/jobs/{response.json()['id']}")).json()["spec"]["task"]["verbalizer"]
    assert stored == {"entailment": [" Yes", " True"]}
    for empty in ([], [" w"] * 65):
        task["verbalizer"] = {"entailment": empty}
        response = await app_client.post("/v1/jobs", json=label_job(task=task))
        assert response.status_code == 422
        assert any(loc.startswith("body.task.verbalizer.entailment") for loc in locs(response)), locs(response)


async def test_capability_refusal_names_capability_and_backends(app_client, monkeypatch):
    from app.llm.port import Capability
    from app.optimizers.opro import Opro

    monkeypatch.setattr(Opro, "scorer_needs", frozenset({Capability.DEEP_PROMPT}))
    response = await app_client.post("/v1/jobs", json=label_job())
    assert response.status_code == 422
    (detail,) = details(response)
    assert detail["loc"] == ["body", "backends", "scorer"]
    assert "deep_prompt" in detail["msg"] and "'default'" in detail["msg"]
    assert detail["allowed"] == ["local"]


async def test_unknown_ids_are_404(app_client):
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/candidates", "/v1/jobs/nope/events", "/v1/datasets/nope"):
        response = await app_client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    response = await app_client.post("/v1/jobs/nope/cancel")
    assert response.status_code == 404


async def test_dataset_validation(app_client):
    response = await app_client.post("/v1/datasets", json={"name": "x", "examples": [{"input": "a"}]})
    assert response.status_code == 422
    assert "body.examples.0.target" in locs(response)

    response = await app_client.post("/v1/datasets", json={"name": "x", "examples": []})
    assert response.status_code == 422
    assert "body.examples" in locs(response)

    bad_jsonl = b'{"input": "a", "target": "b"}\n{"input": "c"}\n'
    response = await app_client.post("/v1/datasets", files={"file": ("d.jsonl", bad_jsonl)}, data={"name": "d"})
    assert response.status_code == 422
    assert locs(response) == ["body.file.line 2.target"]

    response = await app_client.post("/v1/datasets", files={"file": ("d.jsonl", b"{not json\n")})
    assert response.status_code == 422
    assert locs(response) == ["body.file.line 1"]


async def test_dataset_roundtrip_json_and_jsonl(app_client):
    examples = [{"input": f"q{i}", "target": f"a{i}"} for i in range(5)]
    created = await app_client.post("/v1/datasets", json={"name": "json-set", "examples": examples})
    assert created.status_code == 201
    dataset = created.json()
    assert dataset["n_examples"] == 5 and dataset["source"] == "uploaded"

    read = (await app_client.get(f"/v1/datasets/{dataset['id']}?examples_limit=2")).json()
    assert read["examples"] == examples[:2]

    jsonl = "\n".join(json.dumps(e) for e in examples).encode()
    uploaded = await app_client.post("/v1/datasets", files={"file": ("set.jsonl", jsonl)}, data={"name": "jl"})
    assert uploaded.status_code == 201
    assert uploaded.json()["name"] == "jl" and uploaded.json()["n_examples"] == 5

    page1 = (await app_client.get("/v1/datasets?limit=1")).json()
    assert len(page1["items"]) == 1 and page1["next_cursor"]
    page2 = (await app_client.get(f"/v1/datasets?limit=1&cursor={page1['next_cursor']}")).json()
    assert page2["items"][0]["id"] != page1["items"][0]["id"]


async def test_builtin_datasets_listed_with_defaults(app_client):
    builtin = (await app_client.get("/v1/datasets?source=builtin")).json()["items"]
    names = {d["id"] for d in builtin}
    assert {"builtin:dbpedia16", "builtin:snli16", "builtin:gsm8k", "builtin:bbh_boolean_expressions"} <= names
    dbpedia = (await app_client.get("/v1/datasets/builtin:dbpedia16")).json()
    assert dbpedia["n_examples"] == 224
    assert dbpedia["defaults"]["metric"] == "label_accuracy" and len(dbpedia["defaults"]["labels"]) == 14
    assert "CC BY-SA" in dbpedia["license"]


async def test_methods_and_backends(app_client):
    methods = (await app_client.get("/v1/methods")).json()
    opro = next(m for m in methods if m["name"] == "opro")
    steps = opro["parameters"]["properties"]["steps"]
    assert steps["default"] == 200 and steps["minimum"] == 0 and steps["maximum"] == 10_000
    assert opro["optimizer_needs"] == ["generate"]
    assert "small" in opro["presets"]
    # expected calls per preset for the asked split sizes: OPRO small = S + N*c*S + N*c + (N+1)*D, plus 2 x test
    assert set(opro["expected_calls"]) == {"default", "paper", "small"}
    assert opro["expected_calls"]["small"] == 112 + 4 * 4 * 112 + 4 * 4 + 5 * 56 + 2 * 56
    # evaluate and select do not search (no paper/small presets to size); fewshot has no paper to follow
    searching = [m for m in methods if m["name"] not in ("evaluate", "select", "fewshot")]
    assert all(m["expected_calls"]["paper"] > m["expected_calls"]["small"] for m in searching)
    fewshot = next(m for m in methods if m["name"] == "fewshot")["expected_calls"]
    assert fewshot["large"] > fewshot["default"] > fewshot["small"]
    bigger = (await app_client.get("/v1/methods?n_train=500&n_dev=100&n_test=100")).json()
    assert next(m for m in bigger if m["name"] == "opro")["expected_calls"]["small"] > opro["expected_calls"]["small"]
    assert (await app_client.get("/v1/methods?n_train=0")).status_code == 422

    backends = {b["name"]: b for b in (await app_client.get("/v1/backends")).json()}
    assert "label_logprobs" in backends["default"]["capabilities"]
    assert "deep_prompt" in backends["local"]["capabilities"]
    assert "deep_prompt" not in backends["default"]["capabilities"]


async def test_a_budget_too_small_for_the_parameters_is_a_warning_not_an_error(app_client):
    tight = await app_client.post("/v1/jobs", json=label_job(params={"steps": 50}, budget={"max_llm_calls": 100}))
    assert tight.status_code == 202
    (warning,) = tight.json()["warnings"]
    assert "max_llm_calls 100" in warning and "stop on the budget" in warning
    roomy = await app_client.post("/v1/jobs", json=label_job(budget={"max_llm_calls": 100_000}))
    assert roomy.status_code == 202 and roomy.json()["warnings"] == []
    for job in (tight.json(), roomy.json()):
        await app_client.post(f"/v1/jobs/{job['id']}/cancel")
    # the warning is kept with the job, as an event
    async with app_client.stream("GET", f"/v1/jobs/{tight.json()['id']}/events") as response:
        text = ""
        async for chunk in response.aiter_text():
            text += chunk
            if "event: warning" in text and "stop on the budget" in text:
                break
    assert "event: warning" in text


async def test_accepted_job_is_kept_and_listed(app_client):
    body = label_job()
    body["params"] = {"preset": "small", "steps": 1}
    response = await app_client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["spec"]["params"]["candidates_per_step"] == 4  # from the preset
    assert job["spec"]["params"]["steps"] == 1  # explicit value wins over the preset
    assert job["spec"]["task"]["labels"] == ["entailment", "neutral", "contradiction"]

    listed = (await app_client.get("/v1/jobs?limit=200")).json()
    assert job["id"] in [j["id"] for j in listed["items"]]
    bad = await app_client.get("/v1/jobs?cursor=%%%")
    assert bad.status_code == 422


async def test_openapi_docs(app_client):
    schema = (await app_client.get("/openapi.json")).json()
    assert "/v1/jobs" in schema["paths"]
    assert (await app_client.get("/docs")).status_code == 200


async def test_docs_pages_work_offline(app_client):
    """Swagger UI and ReDoc come from the package: the pages name no other host, and every asset they load is
    served here."""
    import re

    for page in ("/docs", "/redoc"):
        response = await app_client.get(page)
        assert response.status_code == 200
        html = response.text
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), html
        assets = re.findall(r"(?:src|href)=[\"']?(/static/docs/[^\"' >]+)", html)
        assert assets, html
        for asset in assets:
            served = await app_client.get(asset)
            assert served.status_code == 200 and len(served.content) > 1000, asset
