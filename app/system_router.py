"""Methods, backends, health and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.deps import ServicesDep
from app.optimizers.registry import METHODS

router = APIRouter(tags=["system"])


class MethodRead(BaseModel):
    name: str
    description: str
    scorer_needs: list[str]
    optimizer_needs: list[str]
    parameters: dict[str, Any]
    presets: dict[str, dict[str, Any]]


class BackendRead(BaseModel):
    name: str
    kind: str
    model_id: str
    capabilities: list[str]
    max_concurrency: int
    probe_error: str | None = None


@router.get("/v1/methods", response_model=list[MethodRead])
async def list_methods() -> list[MethodRead]:
    """Each method with its parameters (JSON Schema: defaults, bounds, descriptions) and needed capabilities."""
    return [
        MethodRead(
            name=name,
            description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else name,
            scorer_needs=sorted(c.value for c in cls.scorer_needs),
            optimizer_needs=sorted(c.value for c in cls.optimizer_needs),
            parameters=cls.params_model.model_json_schema(),
            presets=cls.presets,
        )
        for name, cls in METHODS.items()
    ]


@router.get("/v1/backends", response_model=list[BackendRead])
async def list_backends(services: ServicesDep) -> list[BackendRead]:
    registry = services.registry
    out = []
    for name in registry.names:
        info = registry.info(name)
        out.append(
            BackendRead(
                name=name,
                kind=info.kind,
                model_id=info.model_id,
                capabilities=sorted(c.value for c in info.capabilities),
                max_concurrency=info.max_concurrency,
                probe_error=registry.probe_error(name),
            )
        )
    return out


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, probe in (("database", services.db.ping), ("queue", services.queue.ping)):
        try:
            await probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {exc}"
    for name in services.registry.names:
        error = services.registry.probe_error(name)
        checks[f"backend:{name}"] = "ok" if error is None else f"error: {error}"
    ready = all(v == "ok" for k, v in checks.items() if not k.startswith("backend:"))
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
