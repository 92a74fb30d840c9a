from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.datasets import service
from app.datasets.builtin import BUILTIN_TASKS
from app.datasets.repository import DatasetRepository
from app.datasets.schemas import DatasetCreate, DatasetPage, DatasetRead
from app.deps import PrincipalDep, ServicesDep, TenantDep, TenantFilter, listed_tenant
from app.errors import InvalidPayload, NotFound
from app.idempotency.service import IdempotencyKey, create_once
from app.input_limits import check_examples
from app.openapi_responses import BODY_ERRORS, V1_ERRORS, error_responses, schema_ref

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=V1_ERRORS)


@router.post(
    "",
    status_code=201,
    response_model=DatasetRead,
    responses={**BODY_ERRORS, **error_responses(400, 409)},
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": schema_ref(DatasetCreate)},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "name": {"type": "string"},
                            "file": {"type": "string", "format": "binary", "description": "JSON Lines"},
                        },
                    }
                },
            },
            "required": True,
        }
    },
)
async def create_dataset(
    request: Request,
    services: ServicesDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
):
    """Create a dataset from a JSON body `{"name", "examples": [{"input", "target"}]}` or a JSONL file upload."""
    content_type = request.headers.get("content-type", "")
    upload_form = content_type.startswith("multipart/form-data")
    if upload_form:
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidPayload(["file"], "a JSONL file is required (multipart field 'file')")
        raw = await upload.read()  # the whole request was bounded by api.max_upload_bytes (413 beyond)
        name = form.get("name") or upload.filename or "upload"
        payload = service.parse_jsonl(str(name), raw)
    else:
        try:
            body = await request.json()
        except ValueError as exc:
            raise InvalidPayload([], "body must be JSON (or multipart/form-data with a JSONL file)") from exc
        try:
            payload = DatasetCreate.model_validate(body)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
            ) from exc

    check_examples(["file"] if upload_form else ["examples"], payload.examples, services.settings.api.limits)

    async def create(session) -> tuple[int, dict]:
        row = await service.create_dataset(DatasetRepository(session), payload, tenant)
        return 201, service.dataset_read(row, examples_limit=0).model_dump(mode="json")

    body = payload.model_dump(mode="json")
    replayed, created = await create_once(services.db, tenant, "datasets", idempotency_key, body, create)
    if replayed is not None:
        return replayed
    return JSONResponse(created, status_code=201)


@router.get("", response_model=DatasetPage, responses=error_responses(403))
async def list_datasets(
    services: ServicesDep,
    principal: PrincipalDep,
    tenant_filter: TenantFilter = None,
    source: Literal["uploaded", "builtin"] = "uploaded",
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> DatasetPage:
    if source == "builtin":
        return DatasetPage(items=[service.builtin_read(t, 0) for t in BUILTIN_TASKS.values()], next_cursor=None)
    async with services.db.transaction() as session:
        try:
            rows, next_cursor = await DatasetRepository(session).list(
                tenant=listed_tenant(principal, tenant_filter), limit=limit, cursor=cursor
            )
        except ValueError as exc:
            raise InvalidPayload(["cursor"], str(exc), location="query") from exc
        return DatasetPage(items=[service.dataset_read(r, 0) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetRead, responses=error_responses(404))
async def get_dataset(
    dataset_id: str,
    services: ServicesDep,
    tenant: TenantDep,
    examples_limit: Annotated[int, Query(ge=0, le=10_000)] = 20,
) -> DatasetRead:
    builtin = service.builtin_task(dataset_id)
    if builtin is not None:
        return service.builtin_read(builtin, examples_limit)
    async with services.db.transaction() as session:
        row = await DatasetRepository(session).get(dataset_id, tenant)
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return service.dataset_read(row, examples_limit)
