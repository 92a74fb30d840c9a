"""One backend instance per configured name per process (one pool, one concurrency limit each)."""

from __future__ import annotations

import asyncio
import logging

from app.llm.breaker import CircuitBreaker
from app.llm.port import BackendError, BackendInfo, Capability, LLMBackend
from app.settings import BackendSettings, Settings
from app.usage import TokenPrice

log = logging.getLogger(__name__)


def build_backend(
    name: str, config: BackendSettings, settings: Settings, *, defer_prompt_embeds: bool = False
) -> LLMBackend:
    if config.kind == "local":
        from app.llm.local import LocalBackend

        return LocalBackend(name, config, settings.model_cache_dir)
    from app.llm.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(name, config, defer_prompt_embeds=defer_prompt_embeds)


class BackendRegistry:
    def __init__(
        self, settings: Settings, backends: dict[str, LLMBackend] | None = None, *, defer_prompt_embeds: bool = False
    ) -> None:
        """`defer_prompt_embeds`: for a process that runs no job (the API): HTTP backends do not read their
        `embedding_weights` at start-up, only before a soft prompt this process sends itself (`probe`)."""
        self.settings = settings
        self.defer_prompt_embeds = defer_prompt_embeds
        self._backends: dict[str, LLMBackend] = dict(backends or {})
        self._started: set[str] = set()
        self._probe_errors: dict[str, str] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(set(self.settings.backends) | set(self._backends))

    def _backend(self, name: str) -> LLMBackend:
        if name not in self._backends:
            if name not in self.settings.backends:
                raise KeyError(name)
            self._backends[name] = build_backend(
                name, self.settings.backends[name], self.settings, defer_prompt_embeds=self.defer_prompt_embeds
            )
        return self._backends[name]

    def info(self, name: str) -> BackendInfo:
        return self._backend(name).info

    def probe_error(self, name: str) -> str | None:
        return self._probe_errors.get(name)

    def capabilities(self, name: str) -> frozenset[Capability]:
        return self._backend(name).info.capabilities

    def with_capability(self, capability: Capability) -> list[str]:
        return [name for name in self.names if capability in self.capabilities(name)]

    async def probe_all(self) -> None:
        """Start-up probe of HTTP backends; the local runner knows its capabilities without loading."""
        for name in self.names:
            backend = self._backend(name)
            if backend.info.kind == "local":
                continue
            try:
                await backend.start()
                self._started.add(name)
                self._probe_errors.pop(name, None)
            except Exception as exc:  # a backend that is down must not stop the API from starting
                self._probe_errors[name] = str(exc)
                log.warning("backend %s failed its probe: %s", name, exc)

    def shared_backends(self) -> list[tuple[str, LLMBackend]]:
        """Backends built in this process whose concurrency is shared with other workers (HTTP ones)."""
        return [(name, b) for name, b in self._backends.items() if hasattr(b, "set_share")]

    def price(self, name: str) -> TokenPrice:
        """What the backend's tokens cost (free unless its settings give a price)."""
        config = self.settings.backends.get(name)
        return config.price.token_price() if config is not None and config.price is not None else TokenPrice()

    def breaker(self, name: str) -> CircuitBreaker:
        """The backend's circuit breaker in this process (every job on it shares it)."""
        if name not in self._breakers:
            backend = self._backend(name)
            config = self.settings.backends.get(name)
            self._breakers[name] = CircuitBreaker(
                name,
                getattr(backend, "health", None),
                probe_interval=config.probe_interval_s if config else 1.0,
                max_wait=config.outage_wait_s if config else 300.0,
            )
        return self._breakers[name]

    def breaker_state(self, name: str) -> dict | None:
        """The breaker's state if this process has used the backend, else None."""
        breaker = self._breakers.get(name)
        return None if breaker is None else breaker.snapshot().public()

    async def reachable(self, name: str, wait_s: float = 2.0) -> str:
        """A live check: "up", "down: <why>", or "n/a" (a backend without a cheap health call, e.g. local)."""
        health = getattr(self._backend(name), "health", None)
        if health is None:
            return "n/a"
        try:
            await asyncio.wait_for(health(), wait_s)
        except Exception as exc:
            return f"down: {str(exc)[:200] or type(exc).__name__}"
        return "up"

    async def get(self, name: str) -> LLMBackend:
        backend = self._backend(name)
        if name not in self._started:
            async with self._lock:
                if name not in self._started:
                    await backend.start()
                    self._started.add(name)
        return backend

    async def get_when_up(self, name: str) -> LLMBackend:
        """`get`, but a backend that cannot be reached at start-up is waited for through its breaker (up to its
        `outage_wait_s`) instead of failing at once: a worker that starts during an outage waits it out."""
        breaker = self.breaker(name)
        while True:
            await breaker.wait_closed()
            try:
                return await self.get(name)
            except BackendError as exc:
                if not exc.transient:
                    raise
                breaker.trip(exc)

    async def aclose(self) -> None:
        for breaker in self._breakers.values():
            await breaker.aclose()
        for backend in self._backends.values():
            await backend.aclose()
