"""Input hygiene at the door: body size, JSON depth and characters Postgres cannot store, before any route runs.

An ASGI middleware, so it sees every route (present and future) the same way:
  * a body larger than the limit is refused with 413 as soon as the declared length or the bytes streamed in
    pass it (JSON bodies `max_body_bytes`, multipart uploads `max_upload_bytes`), never read in full first; a
    JSON body within its limit is read whole here for the checks below, a multipart upload streams on to the app
    as it arrives (it is never held whole);
  * a JSON body nested deeper than `max_json_depth`, or too deep for the parser, is a 422, not a 500, and so is
    one that is not UTF-8;
  * a NUL, another C0 control character (tab, newline and carriage return are fine) or a lone surrogate in a
    JSON string, a query parameter or the path is a 422 naming where it is (Postgres rejects them in text, so
    they would otherwise fail deep inside a job).
Uploaded files are checked by the dataset service with `disallowed_at`, line by line.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ServiceError
from app.settings import ApiSettings

DISALLOWED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def describe(char: str) -> str:
    code = f"U+{ord(char):04X}"
    return f"contains a disallowed character ({code}); control characters other than tab and newline are refused"


def disallowed_at(value: Any, max_depth: int = 10_000) -> tuple[list[str | int], str] | None:
    """(path, message) of the first string (or key) in a JSON value holding a disallowed character, or of the
    point where it nests deeper than `max_depth`; None when it is clean. Iterative: any depth is safe."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            return path, f"nested deeper than {max_depth} levels"
        if isinstance(item, str):
            found = DISALLOWED.search(item)
            if found:
                return path, describe(found.group())
        elif isinstance(item, dict):
            for key, child in item.items():
                found = DISALLOWED.search(key)
                if found:
                    return [*path, key], describe(found.group())
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, i]) for i, child in enumerate(item))
    return None


class InputGuard:
    def __init__(self, app: ASGIApp, settings: ApiSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._check_path_and_query(scope)
        if problem is not None:
            await _answer(send, 422, *problem)
            return
        if scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        content_type = headers.get("content-type", "")
        multipart = content_type.startswith("multipart/form-data")
        limit = self.settings.max_upload_bytes if multipart else self.settings.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        if multipart:
            await self._stream_upload(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        if "json" in content_type or body[:1] in (b"{", b"["):
            problem = self._check_json(body)
            if problem is not None:
                await _answer(send, 422, *problem)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed, body
            if not replayed:
                replayed = True
                message = {"type": "http.request", "body": body, "more_body": False}
                body = b""  # the app holds it now, and lets it go when done
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _stream_upload(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """A multipart upload passes through as it arrives (the multipart parser spools its files to disk), never
        held whole: the bytes are counted, and the read that passes the limit raises `PayloadTooLarge`, which the
        app answers like any service error (413), or this guard does if it reaches here."""
        size = 0

        async def counted() -> Message:
            nonlocal size
            if size > limit:
                raise PayloadTooLarge(limit)
            message = await receive()
            size += len(message.get("body", b""))
            if size > limit:
                raise PayloadTooLarge(limit)
            return message

        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except PayloadTooLarge:
            if started:
                raise
            await _too_large(send, limit)

    def _check_path_and_query(self, scope: Scope) -> tuple[list[str | int], str] | None:
        found = DISALLOWED.search(scope.get("path", ""))
        if found:
            return ["path"], describe(found.group())
        query = scope.get("query_string", b"").decode("utf-8", "replace")
        for key, value in parse_qsl(query, keep_blank_values=True):
            for text in (key, value):
                found = DISALLOWED.search(text)
                if found:
                    return ["query", key], describe(found.group())
        return None

    def _check_json(self, body: bytes) -> tuple[list[str | int], str] | None:
        try:
            value = json.loads(body)
        except RecursionError:
            return ["body"], f"nested deeper than {self.settings.max_json_depth} levels"
        except UnicodeDecodeError:
            return ["body"], "is not valid UTF-8"  # the route's parser would answer 400, not the usual 422
        except ValueError:
            return None  # not JSON: the route's own parser answers with its usual 422
        found = disallowed_at(value, self.settings.max_json_depth)
        if found is None:
            return None
        path, message = found
        return ["body", *path], message


class PayloadTooLarge(ServiceError):
    """A body streamed past its limit while the app was reading it."""

    status_code = 413
    code = "payload_too_large"

    def __init__(self, limit: int) -> None:
        loc, message = ["body"], _too_large_message(limit)
        detail = {"loc": loc, "msg": message, "type": "value_error"}
        super().__init__(f"{'.'.join(loc)}: {message}", [detail], {"connection": "close"})  # the rest is not read


def _too_large_message(limit: int) -> str:
    return f"larger than the limit of {limit} bytes"


async def _too_large(send: Send, limit: int) -> None:
    await _answer(send, 413, ["body"], _too_large_message(limit), code="payload_too_large")


async def _answer(send: Send, status: int, loc: list[str | int], message: str, code: str = "validation_error") -> None:
    text = f"{'.'.join(str(p) for p in loc)}: {message}"
    detail = {"loc": [str(p) for p in loc], "msg": message, "type": "value_error"}
    payload = json.dumps({"error": {"code": code, "message": text, "details": [detail]}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
