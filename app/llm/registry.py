"""One backend instance per configured name per process (one pool, one concurrency limit each)."""

from __future__ import annotations

import asyncio
import logging

from app.llm.port import BackendInfo, Capability, LLMBackend
from app.settings import BackendSettings, Settings

log = logging.getLogger(__name__)


def build_backend(name: str, config: BackendSettings, settings: Settings) -> LLMBackend:
    if config.kind == "local":
        from app.llm.local import LocalBackend

        return LocalBackend(name, config, settings.model_cache_dir)
    from app.llm.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend(name, config)


class BackendRegistry:
    def __init__(self, settings: Settings, backends: dict[str, LLMBackend] | None = None) -> None:
        self.settings = settings
        self._backends: dict[str, LLMBackend] = dict(backends or {})
        self._started: set[str] = set()
        self._probe_errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    @property
    def names(self) -> list[str]:
        return sorted(set(self.settings.backends) | set(self._backends))

    def _backend(self, name: str) -> LLMBackend:
        if name not in self._backends:
            if name not in self.settings.backends:
                raise KeyError(name)
            self._backends[name] = build_backend(name, self.settings.backends[name], self.settings)
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

    async def get(self, name: str) -> LLMBackend:
        backend = self._backend(name)
        if name not in self._started:
            async with self._lock:
                if name not in self._started:
                    await backend.start()
                    self._started.add(name)
        return backend

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
