"""HTTP transport of the openai_compat backend: one aiohttp session (keep-alive pool), JSON in and out, retries.

Why aiohttp: measured on the LLM request path, httpx spent ~4 ms of worker CPU per request (most of it in its
connection-pool scan, which walks every connection on every request and response); aiohttp ~0.6 ms. The pool has
no connection limit of its own: the backend's in-flight limit is the only bound.

Failures: connection errors, timeouts, 408, 429 and 5xx are retried with full-jitter exponential backoff
(`Retry-After` honoured); any other 4xx raises `BackendHTTPError` at once with the server's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from typing import Any

import aiohttp

from app.llm.port import SEND_GATE, BackendError, BackendUnavailable
from app.settings import BackendSettings

log = logging.getLogger(__name__)

PROBE_HEADER = "X-Promptopt-Probe"
# Full-jitter backoff never waits longer than this between two attempts.
MAX_BACKOFF_S = 20.0
# A server asking for more than this in `Retry-After` is not waited on longer than this.
MAX_RETRY_AFTER_S = 60.0
_RETRYABLE_STATUSES = (408, 429)
_RETRYABLE_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)


class BackendHTTPError(BackendError):
    """The server answered with an error status (a 4xx at once, or a 5xx/429 once retries ran out)."""

    def __init__(self, message: str, *, status: int, server_message: str) -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message
        # A server error or "too many requests" passes; a request the server rejects will be rejected again.
        self.transient = status in _RETRYABLE_STATUSES or status >= 500


class _GatedRequest(aiohttp.ClientRequest):
    """Checks the job's send gate once a connection is in hand, right before the request is written: a request
    that waited for a connection (or was paused) while the job lost its lease is refused there, not sent."""

    async def send(self, conn):  # type: ignore[override]
        gate = SEND_GATE.get()
        if gate is not None:
            gate()  # raises SendRefused
        return await super().send(conn)


class Transport:
    """JSON requests to one server, with retries. The session is made on first use, inside the running loop."""

    def __init__(self, name: str, settings: BackendSettings, root_url: str) -> None:
        self.name = name
        self.settings = settings
        self.root_url = root_url
        self._headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._random = random.Random()
        self.failed_attempts = 0  # attempts that failed and were retried or gave up (for tests and logs)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
                request_class=_GatedRequest,
                json_serialize=json.dumps,
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def text(self, url: str) -> str:
        """A plain GET, once, outside any job's send gate (e.g. the server's Prometheus page)."""
        token = SEND_GATE.set(None)
        try:
            async with self._client().get(url, headers={PROBE_HEADER: "1"}) as response:
                body = await response.read()
                if response.status != 200:
                    status, message = response.status, server_message_of(body)
                    error = f"{self.name}: GET {url} -> HTTP {status}"
                    raise BackendHTTPError(error, status=status, server_message=message)
                return body.decode("utf-8", "replace")
        finally:
            SEND_GATE.reset(token)

    async def request(
        self,
        method: str,
        url: str,
        body: dict | None = None,
        *,
        probe: bool = False,
        max_retries: int | None = None,
    ) -> Any:
        """The JSON answer of `method url` with `body`, after retrying transient failures.

        Probe requests (capability probes, health checks) carry `X-Promptopt-Probe: 1` and skip the job's send
        gate, so a test server can tell them from the calls a job is charged for."""
        retries = self.settings.max_retries if max_retries is None else max_retries
        headers = {PROBE_HEADER: "1"} if probe else None
        path = url[len(self.root_url) :] or url
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
        token = SEND_GATE.set(None) if probe else None
        try:
            attempt = 0
            while True:
                retry_after: float | None = None
                status: int | None = None
                server_message = ""
                try:
                    async with self._client().request(method, url, data=data, headers=headers) as response:
                        status = response.status
                        raw = await response.read()
                        retry_after_header = response.headers.get("Retry-After")
                except _RETRYABLE_ERRORS as exc:
                    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                except aiohttp.ClientError as exc:
                    raise BackendError(f"{self.name}: {method} {path} failed: {type(exc).__name__}: {exc}") from exc
                else:
                    if 200 <= status < 300:
                        try:
                            return json.loads(raw)
                        except ValueError:
                            reason = f"HTTP {status} with a body that is not JSON"
                            status = None
                    else:
                        server_message = server_message_of(raw)
                        reason = f"HTTP {status}: {server_message}"
                        if status not in _RETRYABLE_STATUSES and status < 500:
                            message = f"{self.name}: {method} {path} -> {reason}"
                            raise BackendHTTPError(message, status=status, server_message=server_message)
                        retry_after = parse_retry_after(retry_after_header)
                self.failed_attempts += 1
                if attempt >= retries:
                    message = f"{self.name}: {method} {path} failed after {attempt + 1} attempt(s): {reason}"
                    if status is not None:
                        raise BackendHTTPError(message, status=status, server_message=server_message)
                    raise BackendUnavailable(message)
                if retry_after is not None:
                    delay = min(retry_after, MAX_RETRY_AFTER_S)
                else:
                    delay = self._random.uniform(0, min(MAX_BACKOFF_S, self.settings.retry_base_delay_s * 2**attempt))
                attempt += 1
                log.warning(
                    "backend %s: %s %s attempt %d failed (%s); retrying in %.2fs",
                    self.name,
                    method,
                    path,
                    attempt,
                    reason,
                    delay,
                )
                await asyncio.sleep(delay)
        finally:
            if token is not None:
                SEND_GATE.reset(token)


def server_message_of(raw: bytes) -> str:
    """The error message in an OpenAI-style error body (`{"error": {"message": ...}}`), or the body's start."""
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:500].decode("utf-8", "replace") or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])
    return str(data)[:500]


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
