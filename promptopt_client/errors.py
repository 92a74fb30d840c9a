"""Typed errors: every failure of an API call is a `PromptoptError` carrying the API's error body."""

from __future__ import annotations

from typing import Any


class PromptoptError(Exception):
    """An API call failed. `status` is the HTTP status (None when the server was not reached); `code`, `message`
    and `details` come from the API's error body `{"error": {"code", "message", "details"}}`."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.details = details
        self.headers = headers or {}

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.status} {self.message}"


class ConnectionFailed(PromptoptError):
    """The server could not be reached (refused, DNS, timeout)."""


class BadRequest(PromptoptError):
    """400, or 422: the request is invalid; `details` lists each problem with its `loc`."""


class Unauthorized(PromptoptError):
    """401: a missing or wrong API key; 403: the key may not do this."""


class NotFound(PromptoptError):
    """404."""


class Conflict(PromptoptError):
    """409: an Idempotency-Key reused with another body."""


class PayloadTooLarge(PromptoptError):
    """413."""


class RateLimited(PromptoptError):
    """429: a rate limit or quota; `retry_after` is the seconds to wait."""

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        return float(value) if value else None


class Unavailable(PromptoptError):
    """503: the database (or a backend) is down for now; `retry_after` seconds."""

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        return float(value) if value else None


class ServerError(PromptoptError):
    """Any other 5xx."""


ERRORS_BY_STATUS: dict[int, type[PromptoptError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: BadRequest,
    429: RateLimited,
    503: Unavailable,
}


def error_for(status: int, body: Any, headers: dict[str, str]) -> PromptoptError:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message, code, details = str(error.get("message")), error.get("code"), error.get("details")
    else:
        message, code, details = str(body)[:300] if body else "no error body", None, None
    kind = ERRORS_BY_STATUS.get(status, ServerError if status >= 500 else PromptoptError)
    return kind(message, status=status, code=code, details=details, headers=headers)
