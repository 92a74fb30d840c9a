"""Usage counters and hard budgets, shared by every LLM call a job makes."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Usage:
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    cost: float = 0.0  # in the currency the backends' prices are given in

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def add(self, other: Usage) -> None:
        self.llm_calls += other.llm_calls
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cache_hits += other.cache_hits
        self.cost += other.cost


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """A backend's price per token; zero (free) unless configured."""

    prompt: float = 0.0
    completion: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens * self.prompt + completion_tokens * self.completion


class BudgetExhausted(Exception):
    """Raised before a call that the budget cannot cover; the job ends with stop_reason 'budget'."""

    def __init__(self, which: str) -> None:
        super().__init__(f"budget exhausted: {which}")
        self.which = which


@dataclass(slots=True)
class Budget:
    """Hard caps. Calls and tokens are reserved before a request is sent, so usage never passes a cap."""

    max_llm_calls: int | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None
    max_cost: float | None = None
    # Seconds already spent by earlier attempts of the same job (a resumed job keeps its clock).
    elapsed_before: float = 0.0
    _started: float = 0.0
    _reserved_calls: int = 0
    _reserved_tokens: int = 0
    _reserved_cost: float = 0.0

    def start(self) -> None:
        self._started = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self._started if self._started else 0.0)

    def check_time(self) -> None:
        if self.max_seconds is not None and self.elapsed() >= self.max_seconds:
            raise BudgetExhausted("max_seconds")

    def reserve(self, usage: Usage, calls: int, tokens: int, cost: float = 0.0) -> None:
        """Reserve `calls` calls costing at most `tokens` tokens and `cost` money, or raise without reserving
        anything."""
        self.check_time()
        if self.max_llm_calls is not None and usage.llm_calls + self._reserved_calls + calls > self.max_llm_calls:
            raise BudgetExhausted("max_llm_calls")
        spent = usage.prompt_tokens + usage.completion_tokens
        if self.max_tokens is not None and spent + self._reserved_tokens + tokens > self.max_tokens:
            raise BudgetExhausted("max_tokens")
        if self.max_cost is not None and usage.cost + self._reserved_cost + cost > self.max_cost + 1e-12:
            raise BudgetExhausted("max_cost")
        self._reserved_calls += calls
        self._reserved_tokens += tokens
        self._reserved_cost += cost

    def release(self, calls: int, tokens: int, cost: float = 0.0) -> None:
        self._reserved_calls -= calls
        self._reserved_tokens -= tokens
        self._reserved_cost -= cost

    def calls_left(self, usage: Usage) -> int | None:
        if self.max_llm_calls is None:
            return None
        return max(0, self.max_llm_calls - usage.llm_calls - self._reserved_calls)
