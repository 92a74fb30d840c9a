from __future__ import annotations

import asyncio
import json
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
from app.memory import release_freed_memory
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
    limits = services.settings.api.limits
    try:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            # The multipart parser spooled the file to disk (past 1 MB); it is read a line at a time, twice when an
            # Idempotency-Key needs the examples' hash before anything is stored.
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidPayload(["file"], "a JSONL file is required (multipart field 'file')")
            name = str(form.get("name") or upload.filename or "upload")

            def chunks() -> service.Chunks:
                upload.file.seek(0)
                return service.jsonl_chunks(upload.file, name, limits)

        else:
            payload = _json_payload(b"".join([chunk async for chunk in request.stream()]))
            check_examples(["examples"], payload.examples, limits)
            name = payload.name

            def chunks() -> service.Chunks:
                return service.payload_chunks(payload.examples)

        body_hash = None
        if idempotency_key is not None:
            body_hash = await asyncio.to_thread(service.examples_hash, name, chunks())

        async def create(session) -> tuple[int, dict]:
            row = await service.create_dataset(DatasetRepository(session), name, chunks(), tenant)
            return 201, service.dataset_read(row, []).model_dump(mode="json")

        replayed, created = await create_once(
            services.db, tenant, "datasets", idempotency_key, None, create, body_hash=body_hash
        )
    finally:
        release_freed_memory()
    if replayed is not None:
        return replayed
    return JSONResponse(created, status_code=201)


def _json_payload(raw: bytes) -> DatasetCreate:
    """The validated JSON body. Read from the stream and parsed here (`request.json()` would keep the bytes and
    the parsed tree on the request until the answer is sent): only the validated models outlive this call."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidPayload([], "body must be JSON (or multipart/form-data with a JSONL file)") from exc
    try:
        return DatasetCreate.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
        ) from exc


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
        return DatasetPage(items=[service.dataset_read(r, []) for r in rows], next_cursor=next_cursor)


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
        repo = DatasetRepository(session)
        row = await repo.get(dataset_id, tenant)
        if row is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        examples = await repo.examples(row.id, examples_limit) if examples_limit else []
        return service.dataset_read(row, examples)
