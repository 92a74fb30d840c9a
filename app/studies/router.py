"""Thin HTTP layer for studies: parse, call the service inside one transaction, enqueue after commit."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.datasets.repository import DatasetRepository
from app.deps import PrincipalDep, ServicesDep, TenantDep, TenantFilter, listed_tenant
from app.errors import InvalidPayload
from app.idempotency.service import IdempotencyKey, create_once
from app.input_limits import check_chars
from app.jobs.repository import JobRepository
from app.jobs.router import enqueue_committed
from app.metrics import JOBS_SUBMITTED
from app.openapi_responses import BODY_ERRORS, V1_ERRORS, error_responses
from app.studies import service
from app.studies.repository import StudyRepository
from app.studies.schemas import StudyCreate
from app.studies.views import StudyPage, StudyRead

router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=V1_ERRORS)
NOT_FOUND = error_responses(404)


@router.post("", status_code=202, response_model=StudyRead, responses={**BODY_ERRORS, **error_responses(409)})
async def create_study(
    payload: StudyCreate,  # type: ignore[valid-type]
    services: ServicesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
):
    """Create one job per arm x seed (and per baseline x seed); every arm of a seed gets the same split."""
    limits = services.settings.api.limits
    check_chars(["initial_prompt"], payload.initial_prompt, limits.max_prompt_chars, "max_prompt_chars")
    for index, prompt in enumerate(payload.baselines):
        check_chars(["baselines", index], prompt, limits.max_prompt_chars, "max_prompt_chars")

    async def create(session) -> tuple[int, dict]:
        jobs = JobRepository(session)
        await services.quotas.check_submission(tenant, jobs)
        study, runs, warnings = await service.create_study(
            payload,
            studies=StudyRepository(session),
            jobs=jobs,
            datasets=DatasetRepository(session),
            registry=services.registry,
            tenant=tenant,
            webhooks=services.settings.webhooks,
        )
        read = service.study_read(study, runs)
        body = read.model_dump(mode="json")
        body["job_ids"] = [job.id for job in runs]
        body["warnings"] = warnings
        return 202, body

    body = payload.model_dump(mode="json")
    replayed, created = await create_once(services.db, tenant, "studies", idempotency_key, body, create)
    if replayed is not None:
        return replayed
    for job_id in created.pop("job_ids"):
        await enqueue_committed(services, job_id)
    JOBS_SUBMITTED.labels(method="study").inc()
    return created


@router.get("", response_model=StudyPage, responses=error_responses(403))
async def list_studies(
    services: ServicesDep,
    principal: PrincipalDep,
    tenant_filter: TenantFilter = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> StudyPage:
    async with services.db.transaction() as session:
        try:
            rows, next_cursor = await StudyRepository(session).list(
                tenant=listed_tenant(principal, tenant_filter), limit=limit, cursor=cursor
            )
        except ValueError as exc:
            raise InvalidPayload(["cursor"], str(exc), location="query") from exc
        runs = await JobRepository(session).of_studies([row.id for row in rows])
    by_study: dict[str, list] = {row.id: [] for row in rows}
    for job in runs:
        by_study[job.study_id].append(job)
    return StudyPage(items=[service.study_read(row, by_study[row.id]) for row in rows], next_cursor=next_cursor)


@router.get("/{study_id}", response_model=StudyRead, responses=NOT_FOUND)
async def get_study(study_id: str, services: ServicesDep, tenant: TenantDep) -> StudyRead:
    """Progress, the leaderboard (arms by test mean, with intervals, costs and paired comparisons) and the runs."""
    async with services.db.transaction() as session:
        study = await service.get_study(StudyRepository(session), study_id, tenant)
        jobs = JobRepository(session)
        runs = await jobs.of_studies([study.id])
        outcomes = await jobs.test_outcomes([job.id for job in runs])
    return service.study_read(study, runs, outcomes, detailed=True)


@router.post("/{study_id}/cancel", response_model=StudyRead, responses=NOT_FOUND)
async def cancel_study(study_id: str, services: ServicesDep, tenant: TenantDep) -> StudyRead:
    async with services.db.transaction() as session:
        jobs = JobRepository(session)
        study = await service.cancel_study(StudyRepository(session), jobs, study_id, tenant)
        runs = await jobs.of_studies([study.id])
        return service.study_read(study, runs)
