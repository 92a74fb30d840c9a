"""Typed dependencies: the app's shared services live on `app.state.services`.

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a thread pool, which costs
more than the work they do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Query, Request

from app.db import Database
from app.errors import Forbidden
from app.keys.service import KeyChecker, Principal, presented_key
from app.llm.registry import BackendRegistry
from app.queue import JobQueue
from app.quotas.service import Quotas
from app.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    queue: JobQueue
    registry: BackendRegistry
    keys: KeyChecker
    quotas: Quotas


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_principal(
    services: ServicesDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    """The caller, from its API key; every authenticated request counts against its tenant's request rate."""
    principal = await services.keys.principal(presented_key(authorization, x_api_key))
    await services.quotas.check_request(principal.tenant)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_tenant(principal: PrincipalDep) -> str:
    return principal.tenant


TenantDep = Annotated[str, Depends(get_tenant)]

ALL_TENANTS = "*"

# `?tenant=` on list routes: admins may list another tenant's records, or every tenant's with "*".
TenantFilter = Annotated[
    str | None,
    Query(
        alias="tenant",
        max_length=64,
        description='Admin keys only: list this tenant\'s records instead of your own ("*" for every tenant).',
    ),
]


def listed_tenant(principal: Principal, requested: str | None) -> str | None:
    """The tenant a list route shows (None: every tenant)."""
    if requested is None or requested == principal.tenant:
        return principal.tenant
    if not principal.admin:
        raise Forbidden("only admin keys may list another tenant's records")
    return None if requested == ALL_TENANTS else requested
