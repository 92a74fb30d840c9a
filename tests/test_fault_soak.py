"""A soak of 100 small jobs through two worker processes killed at random every few seconds, against an LLM
server answering 20% of calls with 500 and a proxy resetting 10% of requests (bench/fault_soak.py; the long
outages have their own tests in test_faults.py). Counted at the fake server's boundary."""

from __future__ import annotations

from bench.fault_soak import SoakConfig, run_soak
from tests.conftest import REDIS_URL

# At a kill, the answers the worker had received but not yet stored are lost; the next attempt asks again.
# The bound asserted here is generous (the measured mean is in the README); 2 jobs x 16 requests in flight.
LOST_PER_KILL = 32


async def test_soak_of_100_jobs_with_kills_and_llm_faults(database_url, tmp_path):
    cfg = SoakConfig(jobs=100, workers=2, kill_every_s=3.0, llm_outage_s=0, db_outage_s=0, timeout_s=600)
    result = await run_soak(cfg, database_url, REDIS_URL, tmp_path)
    assert result.kills >= 3 and result.connection_resets > 0, result
    assert (result.succeeded, result.not_terminal, result.terminal_events_wrong) == (100, 0, 0), result
    # Every call charged was answered; what was answered and not charged is what kills lost, and is repeated.
    lost = result.answered - result.charged
    assert 0 <= lost <= LOST_PER_KILL * result.kills, result
    assert result.repeated <= LOST_PER_KILL * result.kills, result
