"""Money: per-backend prices give `usage.cost`, `budget.max_cost` stops a job like the other caps, and the estimate
endpoint predicts a small job's usage."""

from __future__ import annotations

import uuid

import pytest

from app.settings import PriceSettings
from app.usage import Budget, BudgetExhausted, TokenPrice, Usage
from promptopt_client import AsyncClient, BadRequest
from tests.conftest import label_job, running_worker, served

PRICE = PriceSettings(prompt_per_million=2_000.0, completion_per_million=8_000.0)  # high, so costs are visible


def priced(settings):
    backends = dict(settings.backends)
    backends["default"] = backends["default"].model_copy(update={"price": PRICE})
    return settings.model_copy(update={"backends": backends})


def test_prices_and_the_cost_cap():
    price = PRICE.token_price()
    assert price.cost(1_000, 100) == pytest.approx(2.0 + 0.8)
    gpu = PriceSettings(gpu_hour=3.6, tokens_per_second=1_000).token_price()
    assert gpu.cost(500, 500) == pytest.approx(3.6 / 3600 / 1000 * 1000)  # $1e-6 a token
    with pytest.raises(ValueError):
        PriceSettings(gpu_hour=2.0)
    budget = Budget(max_cost=1.0)
    budget.reserve(Usage(cost=0.5), 1, 10, 0.4)
    with pytest.raises(BudgetExhausted) as exhausted:
        budget.reserve(Usage(cost=0.5), 1, 10, 0.2)
    assert exhausted.value.which == "max_cost"
    assert TokenPrice().cost(10**6, 10**6) == 0.0


async def test_cost_is_charged_and_max_cost_stops_the_job(settings):
    settings = priced(settings)
    async with served(settings) as url, running_worker(settings), AsyncClient(url) as client:
        # A long search, so that the whole run costs far more than the reserve kept for the test split.
        params = {"steps": 8, "candidates_per_step": 4, "exemplars_per_step": 2}
        # Prompts of their own, so that no other test's cached answers make part of either run free.
        body = label_job(seed=11, params=params, initial_prompt=f"Relate the sentences (priced {uuid.uuid4()}).")
        free = await client.wait((await client.submit_job(body)).id, timeout=60, poll_s=0.1)
        expected = PRICE.token_price().cost(free.usage.prompt_tokens, free.usage.completion_tokens)
        assert free.usage.cost == pytest.approx(expected, rel=1e-6) and free.usage.cost > 0

        cap = free.usage.cost * 0.5
        body = label_job(seed=12, params=params, budget={"max_cost": cap, "max_llm_calls": None})
        body["initial_prompt"] = f"Relate the sentences (capped {uuid.uuid4()})."
        capped = await client.wait((await client.submit_job(body)).id, timeout=60, poll_s=0.1)
        assert capped.status == "succeeded" and capped.stop_reason == "budget"
        assert 0 < capped.usage.cost <= cap and capped.usage.llm_calls < free.usage.llm_calls
        assert capped.best.test_score is not None  # the reserve kept for the test split was enough
        with pytest.raises(BadRequest):
            await client.submit_job(label_job(budget={"max_cost": -1}))


async def test_estimate_predicts_a_small_job(settings):
    """Tolerance: the estimate's calls are the method's formula, an upper bound the real run stays under and within
    half of (duplicates and cache hits make it lower); tokens per call learned from an earlier job within 25%."""
    # A tenant of its own: no earlier job to learn from.
    settings = priced(settings).model_copy(update={"api_keys": [f"estimates-{uuid.uuid4().hex[:6]}:k"]})
    async with served(settings) as url, running_worker(settings), AsyncClient(url, api_key="k") as client:
        body = label_job(seed=21, initial_prompt="Relate the two sentences (estimate test).")
        first = await client.estimate_job(body)
        assert first.split == {"train": 24, "dev": 12, "test": 12} and first.seconds is None
        assert "length" in first.tokens_basis
        job = await client.wait((await client.submit_job(body)).id, timeout=60, poll_s=0.1)
        assert 0.5 * first.expected_llm_calls <= job.usage.llm_calls <= first.expected_llm_calls

        again = await client.estimate_job({**body, "seed": 22})
        assert "earlier" in again.tokens_basis and again.seconds is not None
        assert again.seconds.low <= again.seconds.high
        per_call = (job.usage.prompt_tokens + job.usage.completion_tokens) / job.usage.llm_calls
        assert again.expected_tokens / again.expected_llm_calls == pytest.approx(per_call, rel=0.25)
        assert again.expected_cost == pytest.approx(PRICE.token_price().cost(again.expected_tokens, 0), rel=1e-3)
