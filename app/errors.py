"""Typed errors that carry their HTTP status; rendered as {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import math
from typing import Any, Literal


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class Conflict(ServiceError):
    status_code = 409
    code = "conflict"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class TooManyRequests(ServiceError):
    """A rate limit or quota was reached; `Retry-After` says when the window resets."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float, limit: str) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(message, {"limit": limit, "retry_after_s": seconds}, {"Retry-After": str(seconds)})


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


class InvalidPayload(ServiceError):
    """422 for checks pydantic cannot make alone (they need the database or the backends)."""

    status_code = 422
    code = "validation_error"

    def __init__(
        self,
        loc: list[str | int],
        message: str,
        allowed: Any = None,
        *,
        location: Literal["body", "query", "header", "path"] = "body",
    ) -> None:
        detail: dict[str, Any] = {"loc": [location, *(str(p) for p in loc)], "msg": message, "type": "value_error"}
        if allowed is not None:
            detail["allowed"] = allowed
        shown = loc if location == "body" else [location, *loc]
        super().__init__(f"{'.'.join(str(p) for p in shown)}: {message}", [detail])


class ServiceUnavailable(ServiceError):
    status_code = 503
    code = "unavailable"
