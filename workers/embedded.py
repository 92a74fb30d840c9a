"""Embedded mode: API, worker, SQLite and the in-process queue in one process (the demo, `serve --embedded`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from app.deps import Services
from app.llm.registry import BackendRegistry
from app.main import create_app
from app.queue import JobQueue
from app.settings import Settings
from workers.service import run_worker


def embedded_settings(settings: Settings, database: Path | None = None) -> Settings:
    """SQLite file, in-process queue; backends as configured (default: the local model)."""
    database = database or settings.data_dir / "promptopt.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    return settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{database}", "queue_backend": "inprocess"})


async def _in_process_worker(services: Services) -> None:
    await run_worker(services.settings, services.db, services.queue, services.registry)


def create_embedded_app(
    settings: Settings, *, registry: BackendRegistry | None = None, queue: JobQueue | None = None
) -> FastAPI:
    return create_app(settings, embedded=True, registry=registry, queue=queue, worker=_in_process_worker)
