"""create_app(): routers, lifespan, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.datasets.router import router as datasets_router
from app.db import Database, is_connection_error
from app.deps import Services
from app.docs_pages import install_docs
from app.errors import ServiceError
from app.input_guard import InputGuard
from app.jobs.router import router as jobs_router
from app.jobs.schemas import normalize_job_error
from app.keys.service import KeyChecker
from app.llm.registry import BackendRegistry
from app.metrics import RequestMetrics
from app.migrate import upgrade_async
from app.openapi_responses import install_schemas
from app.queue import InProcessJobQueue, JobQueue, SaqJobQueue
from app.quotas.counters import MemoryWindowCounters, RedisWindowCounters
from app.quotas.service import Quotas
from app.settings import Settings
from app.studies.router import router as studies_router
from app.system_router import router as system_router
from app.ui.routes import install_ui

log = logging.getLogger(__name__)

# Seconds a client is told to wait when the database is unreachable (a restart or failover takes a few).
DATABASE_RETRY_AFTER_S = 5

# Runs a worker inside the API process (embedded mode) until cancelled; the entry point supplies it, so the
# service itself never imports the worker.
InProcessWorker = Callable[[Services], Awaitable[None]]


def error_body(code: str, message: str, details=None) -> dict:
    return {"error": {"code": code, "message": message, "details": details}}


def _validation_details(errors) -> list[dict]:
    details = []
    for err in map(normalize_job_error, errors):
        item = {"loc": [str(p) for p in err.get("loc", ())], "msg": err.get("msg"), "type": err.get("type")}
        ctx = err.get("ctx") or {}
        if "expected" in ctx:
            item["allowed"] = ctx["expected"]
        for bound in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if bound in ctx:
                item[bound] = ctx[bound]
        details.append(item)
    return details


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route answers at the request's path (asked of the routes, which may be nested routers)."""
    path = {"type": "http", "path": request.scope["path"], "root_path": request.scope.get("root_path", "")}
    return [
        method
        for method in _HTTP_METHODS
        if any(route.matches({**path, "method": method})[0] == Match.FULL for route in request.app.router.routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.code, exc.message, exc.details), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc.errors())
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details[:5])
        return JSONResponse(error_body("validation_error", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # The router's own `Allow` names only the first route at the path; GET and POST /v1/jobs are two.
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    # Registered for the exception classes themselves (not only under `Exception`), so Starlette answers them
    # without re-raising to the server, which keeps the client's keep-alive connection open.
    async def _database_error(_: Request, exc: Exception) -> JSONResponse:
        if is_connection_error(exc):
            log.warning("database unreachable: %s", type(exc).__name__)
            return JSONResponse(
                error_body("unavailable", "the database is unavailable; retry shortly"),
                status_code=503,
                headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
            )
        log.exception("database error")
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)

    for database_exception in (SQLAlchemyError, OSError, asyncpg.PostgresError, asyncpg.exceptions.InterfaceError):
        app.add_exception_handler(database_exception, _database_error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)


def create_app(
    settings: Settings | None = None,
    *,
    embedded: bool = False,
    registry: BackendRegistry | None = None,
    queue: JobQueue | None = None,
    worker: InProcessWorker | None = None,
) -> FastAPI:
    """`embedded`: SQLite with migrations applied and the in-process queue (`workers.embedded` adds the worker).
    `worker`: started beside the API once its services are up, stopped with it."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if embedded:
            await upgrade_async(settings.database_url)
        db = Database(settings.database_url)
        job_queue = queue or (
            InProcessJobQueue()
            if embedded or settings.queue_backend == "inprocess"
            else SaqJobQueue(settings.redis_url, settings.queue)
        )
        # The API runs no job, so it never reads embedding weights for soft prompts (HTTP backends defer the
        # prompt_embeds check); embedded mode runs the worker in this process with this registry, so it probes.
        backends = registry or BackendRegistry(settings, defer_prompt_embeds=worker is None)
        await backends.probe_all()
        counters = (
            MemoryWindowCounters()
            if embedded or settings.queue_backend == "inprocess"
            else RedisWindowCounters(settings.redis_url, settings.quotas.redis_prefix)
        )
        services = Services(
            settings=settings,
            db=db,
            queue=job_queue,
            registry=backends,
            keys=KeyChecker(db, settings.api_keys, settings.api.key_cache_seconds),
            quotas=Quotas(settings.quotas, counters),
        )
        app.state.services = services
        worker_task = asyncio.create_task(worker(services)) if worker is not None else None
        try:
            yield
        finally:
            if worker_task is not None:
                worker_task.cancel()
                with contextlib.suppress(BaseException):
                    await worker_task
            if queue is None:
                await job_queue.aclose()
            if registry is None:
                await backends.aclose()
            await services.quotas.aclose()
            await db.dispose()

    app = FastAPI(
        title="promptopt",
        version="0.1.0",
        description="Self-hosted prompt optimization: submit a job, poll or stream it, read the best prompt.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    install_schemas(app)
    install_error_handlers(app)
    app.add_middleware(InputGuard, settings=settings.api)
    app.add_middleware(RequestMetrics)  # outermost: times every answer, the guard's rejections too
    app.include_router(jobs_router)
    app.include_router(datasets_router)
    app.include_router(studies_router)
    app.include_router(system_router)
    install_ui(app)  # the dashboard at / (public shell; its data calls use the API key)
    return app
