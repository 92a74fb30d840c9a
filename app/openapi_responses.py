"""What the OpenAPI document says about errors, defined once: routes and routers name their status codes, e.g.
`responses=error_responses(404, 409)`.

Error bodies are JSON on every route, also on those that answer 200 with another media type (an event stream, the
metrics text), so responses name their schema by `$ref` rather than by FastAPI's `model` (which takes the route's
media type); `install_schemas` adds the models named that way to the document's components."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorInfo(BaseModel):
    code: str = Field(
        description="Stable and machine-readable: `validation_error`, `bad_request`, `not_found`, `conflict`, "
        "`unauthorized`, `forbidden`, `payload_too_large`, `method_not_allowed`, `rate_limited`, `unavailable`, "
        "`internal_error`."
    )
    message: str = Field(description="For people; may change between versions.")
    details: list[dict[str, Any]] | dict[str, Any] | None = Field(
        None,
        description="A validation error lists each problem as `{loc, msg, type}` (with `allowed` or the bound it "
        "broke where there is one); a 429 gives `{limit, retry_after_s}`; null when there is nothing to add.",
    )


class ErrorBody(BaseModel):
    error: ErrorInfo


_REFERENCED: dict[str, type[BaseModel]] = {}


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    """A `$ref` to `model` in the document's components (see `install_schemas`)."""
    _REFERENCED[model.__name__] = model
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def install_schemas(app: FastAPI) -> None:
    """Add the models named by `schema_ref` (and the models they use) to the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schemas = generate().setdefault("components", {}).setdefault("schemas", {})
            for name, model in _REFERENCED.items():
                schema = model.model_json_schema(ref_template=REF_TEMPLATE)
                for used_name, used in schema.pop("$defs", {}).items():
                    schemas.setdefault(used_name, used)
                schemas.setdefault(name, schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _retry_after(why: str) -> dict[str, Any]:
    return {
        "Retry-After": {
            "description": f"Seconds to wait before retrying ({why}).",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    }


ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: {"description": "The body could not be parsed: a malformed multipart body or `Content-Type`."},
    401: {"description": "Missing or invalid API key (`Authorization: Bearer <key>` or `X-API-Key`)."},
    403: {"description": "The API key may not do this."},
    404: {"description": "Not found (or not visible to this API key's tenant)."},
    409: {"description": "The `Idempotency-Key` was already used with a different request body."},
    413: {"description": "The request body is larger than the limit; the connection is closed."},
    422: {"description": "The request is invalid: `error.details` says where (`loc`) and why."},
    429: {
        "description": "A rate limit or quota was reached (`error.details.limit` says which).",
        "headers": _retry_after("when the limit's window resets"),
    },
    503: {
        "description": "The database (or, for `predict`, the LLM backend) is unavailable.",
        "headers": _retry_after("a restart or failover takes a few seconds"),
    },
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these error status codes, each with the JSON error body."""
    content = {"application/json": {"schema": schema_ref(ErrorBody)}}
    return {code: {**ERROR_RESPONSES[code], "content": content} for code in status_codes}


# Every /v1 route: the API key is checked, then the tenant's request rate, and the database is read; the input
# guard answers 422 for characters it refuses in any path or query.
V1_ERRORS = error_responses(401, 422, 429, 503)
# Routes that take a body: the input guard's size limit.
BODY_ERRORS = error_responses(413)
