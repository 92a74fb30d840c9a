"""Workers share one backend's concurrency through Redis: each busy worker gets max_concurrency / busy workers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from app.llm.openai_compat import OpenAICompatBackend
from app.llm.registry import BackendRegistry
from app.queue import SaqJobQueue
from app.settings import BackendSettings, QueueSettings, Settings
from tests.conftest import REDIS_URL
from workers.backend_share import share_backends


def worker(queue_name: str) -> tuple[SaqJobQueue, BackendRegistry, OpenAICompatBackend]:
    config = BackendSettings(kind="openai_compat", base_url="http://127.0.0.1:9/v1", max_concurrency=100, probe=False)
    settings = Settings(redis_url=REDIS_URL, queue=QueueSettings(name=queue_name), backends={"vllm": config})
    backend = OpenAICompatBackend("vllm", config)
    return SaqJobQueue(REDIS_URL, settings.queue), BackendRegistry(settings, {"vllm": backend}), backend


async def test_busy_workers_split_the_backend_and_an_idle_one_gives_its_share_back(redis_client):
    name = f"promptopt-share-{uuid.uuid4().hex[:8]}"
    workers = [worker(name) for _ in range(3)]
    held = [await backend._limit.acquire(1) for _, _, backend in workers[:2]]  # noqa: SLF001  # two are busy
    tasks = [
        asyncio.create_task(share_backends(queue, registry, f"w{i}", interval_s=0.1))
        for i, (queue, registry, _) in enumerate(workers)
    ]
    try:
        await asyncio.sleep(0.5)
        busy, other_busy, idle = (backend for _, _, backend in workers)
        assert busy.share == other_busy.share == 50 and busy.concurrency_limit == 50
        assert idle.share == 34  # it would be the third: ceil(100 / 3)
        other_busy._limit.release(held[1])  # noqa: SLF001  # the second worker goes idle
        await asyncio.sleep(0.5)
        assert busy.share == 100
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for queue, registry, _ in workers:
            await registry.aclose()
            await queue.aclose()
        await redis_client.delete(f"{name}:active:backend:vllm")
