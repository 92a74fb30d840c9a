"""Thin HTTP layer for jobs: parse, call the service inside one transaction, enqueue after commit."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import StreamingResponse

from app.datasets.repository import DatasetRepository
from app.deps import PrincipalDep, ServicesDep, TenantDep, TenantFilter, listed_tenant
from app.errors import InvalidPayload
from app.idempotency.service import IdempotencyKey, create_once
from app.input_limits import check_job, check_predict_inputs
from app.jobs import service
from app.jobs.models import JobStatus
from app.jobs.repository import JobRepository
from app.jobs.schemas import PredictIn, job_create_type
from app.jobs.views import (
    CandidatePage,
    CandidateRead,
    JobEstimate,
    JobPage,
    JobRead,
    Prediction,
    PredictOut,
    WebhookDeliveryRead,
)
from app.metrics import JOBS_SUBMITTED
from app.openapi_responses import BODY_ERRORS, V1_ERRORS, error_responses
from app.webhooks.repository import WebhookRepository

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=V1_ERRORS)
NOT_FOUND = error_responses(404)


# One event of the stream (`itemSchema`: what OpenAPI 3.2 and FastAPI's own event streams use).
JOB_EVENT = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "id": {
            "type": "string",
            "description": "The event's id; send the last one seen as `Last-Event-ID` to resume. `progress` events "
            "have none.",
        },
        "event": {
            "type": "string",
            "description": "`state`, `step`, `warning`, `retry`, `cancel_requested` (stored, with ids) or `progress` "
            "(the job's `progress` object whenever it changed while the job runs).",
        },
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"type": "object"}},
    },
}

JobCreate = job_create_type()
JOB_EXAMPLES = {
    "opro": {
        "summary": "OPRO on a bundled task, every other setting at its default",
        "value": {"method": "opro", "task": {"dataset": "builtin:snli16"}},
    }
}


async def enqueue_committed(services, job_id: str) -> None:
    """Enqueue after the job row is committed. If the queue is down the job stays queued and the
    reconciler enqueues it later, so an accepted job is never lost."""
    try:
        key = await services.queue.enqueue(job_id)
    except Exception:
        log.warning("enqueue of job %s failed; the reconciler will retry", job_id, exc_info=True)
        return
    async with services.db.transaction() as session:
        await JobRepository(session).set_queue_key(job_id, key)


@router.post(
    "",
    status_code=202,
    response_model=JobRead,
    responses={**BODY_ERRORS, **error_responses(409)},
)
async def submit_job(
    payload: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],  # type: ignore[valid-type]
    services: ServicesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
):
    check_job(payload, services.settings.api.limits)

    async def create(session) -> tuple[int, dict]:
        await services.quotas.check_submission(tenant, JobRepository(session))
        job, warnings = await service.submit_job(
            payload,
            jobs=JobRepository(session),
            datasets=DatasetRepository(session),
            registry=services.registry,
            tenant=tenant,
            webhooks=services.settings.webhooks,
        )
        read = service.job_read(job, with_spec=True)
        read.warnings = warnings
        return 202, read.model_dump(mode="json")

    body = payload.model_dump(mode="json")
    replayed, created = await create_once(services.db, tenant, "jobs", idempotency_key, body, create)
    if replayed is not None:
        return replayed
    JOBS_SUBMITTED.labels(method=created["method"]).inc()
    log.info("job %s: queued (%s on %s, tenant %s)", created["id"], created["method"], payload.task.dataset, tenant)
    await enqueue_committed(services, created["id"])
    return created


@router.post("/estimate", response_model=JobEstimate, responses=BODY_ERRORS)
async def estimate_job(
    payload: JobCreate,  # type: ignore[valid-type]
    services: ServicesDep,
    tenant: TenantDep,
) -> JobEstimate:
    """A dry run: validate the job as on submission and estimate its LLM calls, tokens, cost and wall time."""
    check_job(payload, services.settings.api.limits)
    async with services.db.transaction() as session:
        return await service.estimate_job(
            payload,
            jobs=JobRepository(session),
            datasets=DatasetRepository(session),
            registry=services.registry,
            tenant=tenant,
        )


@router.get("", response_model=JobPage, responses=error_responses(403))
async def list_jobs(
    services: ServicesDep,
    principal: PrincipalDep,
    tenant_filter: TenantFilter = None,
    status: JobStatus | None = None,
    method: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> JobPage:
    async with services.db.transaction() as session:
        try:
            rows, next_cursor = await JobRepository(session).list(
                tenant=listed_tenant(principal, tenant_filter), status=status, method=method, limit=limit, cursor=cursor
            )
        except ValueError as exc:
            raise InvalidPayload(["cursor"], str(exc), location="query") from exc
        return JobPage(items=[service.job_read(r) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobRead, responses=NOT_FOUND)
async def get_job(job_id: str, services: ServicesDep, tenant: TenantDep) -> JobRead:
    async with services.db.transaction() as session:
        return service.job_read(await service.get_job(JobRepository(session), job_id, tenant), with_spec=True)


@router.post("/{job_id}/cancel", response_model=JobRead, responses=NOT_FOUND)
async def cancel_job(job_id: str, services: ServicesDep, tenant: TenantDep) -> JobRead:
    async with services.db.transaction() as session:
        job = await service.cancel_job(JobRepository(session), job_id, tenant)
        read = service.job_read(job)
    log.info("job %s: cancel requested (%s)", job_id, read.status)
    return read


@router.get("/{job_id}/candidates", response_model=CandidatePage, responses=NOT_FOUND)
async def list_candidates(
    job_id: str,
    services: ServicesDep,
    tenant: TenantDep,
    order: Literal["score", "step"] = "score",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: str | None = None,
) -> CandidatePage:
    async with services.db.transaction() as session:
        repo = JobRepository(session)
        await service.get_job(repo, job_id, tenant)
        try:
            rows, next_cursor = await repo.candidates(job_id, order=order, limit=limit, cursor=cursor)
        except (ValueError, TypeError) as exc:
            raise InvalidPayload(["cursor"], "malformed cursor", location="query") from exc
        items = [
            CandidateRead(
                id=row.id,
                step=row.step,
                prompt=row.prompt,
                score=row.score,
                dev_score=evals.get("dev"),
                test_score=evals.get("test"),
                details=row.details or {},
                created_at=row.created_at,
            )
            for row, evals in rows
        ]
        return CandidatePage(items=items, next_cursor=next_cursor)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,  # no media type of its own: the one below is the only one documented
    responses={
        200: {
            "description": "Server-Sent Events, until the job has reached a final state and every event is sent; "
            "comment lines keep the connection alive.",
            "content": {"text/event-stream": {"itemSchema": JOB_EVENT}},
        },
        **NOT_FOUND,
    },
)
async def job_events(
    job_id: str,
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Server-Sent Events: every state change and step (with ids; reconnect with Last-Event-ID to resume), and
    `progress` events without ids while the job runs: its `progress` whenever it changed (phase, answers done)."""
    async with services.db.transaction() as session:
        await service.get_job(JobRepository(session), job_id, tenant)
    try:
        after = int(last_event_id) if last_event_id else 0
    except ValueError as exc:
        raise InvalidPayload(["Last-Event-ID"], "must be an integer event id", location="header") from exc

    async def stream():
        nonlocal after
        idle = 0.0
        progress = None
        while True:
            async with services.db.transaction() as session:
                repo = JobRepository(session)
                events = await repo.events_after(job_id, after)
                job = await repo.get(job_id)
            for event in events:
                after = event.id
                payload = json.dumps({**event.data, "created_at": event.created_at.isoformat()})
                yield f"id: {event.id}\nevent: {event.type}\ndata: {payload}\n\n"
            if job is None or (JobStatus(job.status).terminal and not events):
                return
            # The running phase's progress when it changed: not stored, so no id (a resumed stream skips none).
            if job.status == JobStatus.RUNNING and (now := service.job_progress(job)) != progress:
                progress = now
                yield f"event: progress\ndata: {now.model_dump_json()}\n\n"
            if await request.is_disconnected():
                return
            if not events:
                idle += 0.5
                if idle >= 15:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                await asyncio.sleep(0.5)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/{job_id}/artifact", responses=NOT_FOUND)
async def get_artifact(
    job_id: str, services: ServicesDep, tenant: TenantDep, use: Literal["best", "initial"] = "best"
) -> dict:
    """The artifact behind the job's best prompt: a soft prompt (BBT/BBTv2: z, projection seed and scales, model),
    a trained head (CrossTune: weights, label order and descriptions, feature model), or demonstrations chosen per
    input (fewshot: the instruction, k and the retrieval pool)."""
    async with services.db.transaction() as session:
        return await service.job_artifact(JobRepository(session), job_id, tenant, use)


@router.get("/{job_id}/webhooks", response_model=list[WebhookDeliveryRead], responses=NOT_FOUND)
async def webhook_deliveries(job_id: str, services: ServicesDep, tenant: TenantDep) -> list[WebhookDeliveryRead]:
    """The job's webhook deliveries, oldest first, with each one's attempts and last outcome."""
    async with services.db.transaction() as session:
        await service.get_job(JobRepository(session), job_id, tenant)
        rows = await WebhookRepository(session).of_job(job_id)
        return [WebhookDeliveryRead.model_validate(row, from_attributes=True) for row in rows]


@router.post("/{job_id}/predict", response_model=PredictOut, responses={**BODY_ERRORS, **NOT_FOUND})
async def predict(job_id: str, body: PredictIn, services: ServicesDep, tenant: TenantDep) -> PredictOut:
    """Apply the job's best (or initial) prompt - text, soft-prompt or trained-head artifact - to new inputs."""
    check_predict_inputs(body.inputs, services.settings.api.limits)
    async with services.db.transaction() as session:
        prompt, backend_name = await service.prediction_prompt(
            JobRepository(session), job_id, tenant, body, DatasetRepository(session)
        )
    # A calibrated prediction scores the job's train inputs too: their answers are in the evaluation cache.
    outputs = await service.predict(
        services.registry,
        prompt,
        backend_name,
        body.inputs,
        cache=service.cache_reader(services.db) if prompt.reference else None,
        cache_scope=tenant if services.settings.cache_scope == "tenant" else None,
    )
    return PredictOut(
        prompt=prompt.description,
        predictions=[Prediction(input=i, output=o) for i, o in zip(body.inputs, outputs, strict=True)],
    )
