"""Typed errors that carry their HTTP status; rendered as {"error": {"code", "message", "details"}}."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class InvalidPayload(ServiceError):
    """422 for checks pydantic cannot make alone (they need the database or the backends)."""

    status_code = 422
    code = "validation_error"

    def __init__(self, loc: list[str | int], message: str, allowed: Any = None) -> None:
        detail: dict[str, Any] = {"loc": ["body", *loc], "msg": message, "type": "value_error"}
        if allowed is not None:
            detail["allowed"] = allowed
        super().__init__(f"{'.'.join(str(p) for p in loc)}: {message}", [detail])


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "unavailable"
