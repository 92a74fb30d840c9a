"""Typed dependencies: the app's shared services live on `app.state.services`.

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, which costs
more than the work they do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from app.auth import tenant_of
from app.db import Database
from app.llm.registry import BackendRegistry
from app.queue import JobQueue
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    queue: JobQueue
    registry: BackendRegistry


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_tenant(request: Request, services: ServicesDep) -> str:
    return tenant_of(request, services.settings)


TenantDep = Annotated[str, Depends(get_tenant)]
