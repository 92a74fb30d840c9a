"""Why an attempt ended, in two kinds: transient faults end the attempt and the job is retried from its last
checkpoint; permanent ones fail the job. Every fault has a code and a message fit to show a client (no SQL, no
parameters, no traceback: those go to the worker's log)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from app.cache.store import CacheWriteFailed
from app.db import is_connection_error
from app.llm.port import BackendError, CapabilityMissing


class AttemptStalled(RuntimeError):
    """The attempt made no progress (no LLM answer, no database write) for too long."""


@dataclass(frozen=True, slots=True)
class Fault:
    code: str
    message: str
    transient: bool

    def error_text(self) -> str:
        return f"{self.code}: {self.message}"


def classify(exc: BaseException) -> Fault:
    if isinstance(exc, BackendError):
        if exc.transient:
            return Fault("backend_unavailable", str(exc), True)
        code = "capability_missing" if isinstance(exc, CapabilityMissing) else "backend_error"
        return Fault(code, str(exc), False)
    if isinstance(exc, CacheWriteFailed) or is_connection_error(exc):
        return Fault("database_unavailable", "the database could not be reached", True)
    if isinstance(exc, AttemptStalled):
        return Fault("stalled", str(exc), True)
    if isinstance(exc, ValueError):  # the spec or data asks for something the method cannot do (incl. pydantic)
        return Fault("invalid_job", str(exc)[:2000], False)
    return Fault("internal_error", f"internal error ({type(exc).__name__}); details are in the worker log", False)


def retry_delay(retries_so_far: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter: uniform in [d/2, d], d = min(cap, base * 2**retries_so_far)."""
    ceiling = min(cap, base * 2**retries_so_far)
    return (rng or random).uniform(ceiling / 2, ceiling)
