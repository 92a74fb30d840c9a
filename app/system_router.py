"""Methods, backends, health and metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import ServicesDep, get_principal
from app.metrics import refresh_job_gauges
from app.openapi_responses import V1_ERRORS, error_responses
from app.optimizers.registry import METHODS
from app.system_views import BackendRead, MethodRead, Readiness

# `router` holds both: the /v1 routes, with their common errors, and the probes and metrics, which have none of them.
# Behind the API keys like every /v1 route (the backends list shows infrastructure).
v1_router = APIRouter(tags=["system"], responses=V1_ERRORS, dependencies=[Depends(get_principal)])
probes_router = APIRouter(tags=["system"])


@v1_router.get("/v1/methods", response_model=list[MethodRead])
async def list_methods(
    n_train: Annotated[int, Query(ge=1, le=1_000_000, description="Training examples, for `expected_calls`.")] = 112,
    n_dev: Annotated[int, Query(ge=0, le=1_000_000, description="Dev examples, for `expected_calls`.")] = 56,
    n_test: Annotated[int, Query(ge=0, le=1_000_000, description="Test examples, for `expected_calls`.")] = 56,
    num_layers: Annotated[int, Query(ge=1, le=1000, description="Model layers (BBTv2 steps per layer).")] = 30,
) -> list[MethodRead]:
    """Each method with its parameters (JSON Schema: defaults, bounds, descriptions), needed capabilities, presets
    and their expected LLM calls (the defaults: builtin:dbpedia16's default split on the 30-layer local model)."""
    out = []
    for name, cls in METHODS.items():
        configs = {"default": {}, **cls.presets}
        calls = {
            label: cls.expected_calls(cls.params_model(**values), n_train, n_dev, num_layers) + 2 * n_test
            for label, values in configs.items()
        }
        out.append(
            MethodRead(
                name=name,
                description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else name,
                scorer_needs=sorted(c.value for c in cls.scorer_needs),
                optimizer_needs=sorted(c.value for c in cls.optimizer_needs),
                parameters=cls.params_model.model_json_schema(),
                presets=cls.presets,
                expected_calls=calls,
            )
        )
    return out


@v1_router.get("/v1/backends", response_model=list[BackendRead])
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
                detail=info.detail,
                reachable=await registry.reachable(name),
                breaker=registry.breaker_state(name),
            )
        )
    return out


@probes_router.get("/healthz", responses=error_responses(422))
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes_router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The database or the queue is unreachable."}}
    | error_responses(422),
)
async def readyz(services: ServicesDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, probe in (("database", services.db.ping), ("queue", services.queue.ping)):
        try:
            await probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {exc}"
    for name in services.registry.names:
        # A backend that is down does not make the API unready (jobs wait for it), but it is reported.
        reachable = await services.registry.reachable(name)
        breaker = services.registry.breaker_state(name) or {}
        if reachable.startswith("down"):
            checks[f"backend:{name}"] = reachable
        elif breaker.get("state") == "open":
            checks[f"backend:{name}"] = f"down: breaker open: {breaker.get('last_error')}"
        else:
            error = services.registry.probe_error(name)
            checks[f"backend:{name}"] = "ok" if error is None or reachable == "up" else f"error: {error}"
    ready = all(v == "ok" for k, v in checks.items() if not k.startswith("backend:"))
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


@probes_router.get("/metrics", response_class=PlainTextResponse, responses=error_responses(422))
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text exposition format."""
    await refresh_job_gauges(services.db, services.queue, METHODS)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


router = APIRouter()
router.include_router(v1_router)
router.include_router(probes_router)
