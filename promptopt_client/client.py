"""The promptopt API from Python, async (`AsyncClient`) and sync (`Client`), typed with the server's own response
models."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from app.datasets.schemas import DatasetPage, DatasetRead
from app.jobs.views import CandidatePage, JobEstimate, JobPage, JobRead, PredictOut, WebhookDeliveryRead
from app.studies.views import StudyPage, StudyRead
from app.system_views import BackendRead, MethodRead
from promptopt_client.errors import ConnectionFailed, PromptoptError, error_for

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
Model = TypeVar("Model", bound=BaseModel)


@dataclass(slots=True)
class JobEvent:
    """One Server-Sent Event of a job: `state`, `step`, `warning`, `cancel_requested`, ..., and `progress` (the
    running phase's progress, as the job's `progress` shows it; not stored, so it has no id)."""

    id: int | None
    event: str
    data: dict[str, Any] = field(default_factory=dict)


def _body(value: dict | BaseModel) -> dict:
    return value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else value


class AsyncClient:
    """`url` defaults to $PROMPTOPT_URL (else http://127.0.0.1:8000), `api_key` to $PROMPTOPT_API_KEY.
    Every failure raises a `PromptoptError` subclass; `ConnectionFailed` when the server is not reached."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("PROMPTOPT_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("PROMPTOPT_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs) -> Any:
        """One call; the decoded JSON answer, or a `PromptoptError`."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach the API at {self.url} ({type(exc).__name__})") from exc
        return self._decode(response)

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if response.status_code >= 400:
            raise error_for(response.status_code, body, dict(response.headers))
        return body

    async def _get(self, model: type[Model], path: str, **params) -> Model:
        query = {k: v for k, v in params.items() if v is not None}
        return model.model_validate(await self.request("GET", path, params=query))

    # --- jobs ---------------------------------------------------------------------------------------------

    async def submit_job(self, job: dict | BaseModel, *, idempotency_key: str | None = None) -> JobRead:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return JobRead.model_validate(await self.request("POST", "/v1/jobs", json=_body(job), headers=headers))

    async def estimate_job(self, job: dict | BaseModel) -> JobEstimate:
        """A dry run: the job validated as on submission, with its expected calls, tokens, cost and time."""
        return JobEstimate.model_validate(await self.request("POST", "/v1/jobs/estimate", json=_body(job)))

    async def get_job(self, job_id: str) -> JobRead:
        return await self._get(JobRead, f"/v1/jobs/{job_id}")

    async def list_jobs(
        self, *, status: str | None = None, method: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        return await self._get(JobPage, "/v1/jobs", status=status, method=method, limit=limit, cursor=cursor)

    async def iter_jobs(self, *, status: str | None = None, method: str | None = None) -> AsyncIterator[JobRead]:
        """Every job, newest first, page after page."""
        cursor = None
        while True:
            page = await self.list_jobs(status=status, method=method, limit=200, cursor=cursor)
            for job in page.items:
                yield job
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel_job(self, job_id: str) -> JobRead:
        return JobRead.model_validate(await self.request("POST", f"/v1/jobs/{job_id}/cancel"))

    async def candidates(
        self, job_id: str, *, order: str = "step", limit: int = 100, cursor: str | None = None
    ) -> CandidatePage:
        return await self._get(CandidatePage, f"/v1/jobs/{job_id}/candidates", order=order, limit=limit, cursor=cursor)

    async def predict(
        self, job_id: str, inputs: list[str], *, use: str = "best", backend: str | None = None
    ) -> PredictOut:
        body = {"inputs": inputs, "use": use, **({"backend": backend} if backend else {})}
        return PredictOut.model_validate(await self.request("POST", f"/v1/jobs/{job_id}/predict", json=body))

    async def webhook_deliveries(self, job_id: str) -> list[WebhookDeliveryRead]:
        answer = await self.request("GET", f"/v1/jobs/{job_id}/webhooks")
        return [WebhookDeliveryRead.model_validate(d) for d in answer]

    async def artifact(self, job_id: str, *, use: str = "best") -> dict[str, Any]:
        return await self.request("GET", f"/v1/jobs/{job_id}/artifact", params={"use": use})

    # `timeout` as a parameter (not asyncio.timeout) so the sync Client offers the same call.
    async def wait(self, job_id: str, timeout: float | None = None, *, poll_s: float = 1.0) -> JobRead:  # noqa: ASYNC109
        """The job once it has ended (succeeded, failed or cancelled); `TimeoutError` after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get_job(job_id)
            if job.status in TERMINAL:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            await asyncio.sleep(poll_s if deadline is None else min(poll_s, max(0.0, deadline - time.monotonic())))

    async def events(
        self, job_id: str, *, last_event_id: int | None = None, reconnects: int = 5
    ) -> AsyncIterator[JobEvent]:
        """The job's events until it has ended. A dropped connection is resumed from the last event seen
        (`Last-Event-ID`), up to `reconnects` times in a row."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
            try:
                async with self.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30.0, read=None)
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        self._decode(response)
                    async for event in _parse_sse(response.aiter_lines()):
                        failures = 0
                        if event.id is not None:
                            last_event_id = event.id
                        yield event
                return  # the server ends the stream once the job has ended and every event is sent
            except (httpx.TransportError, httpx.StreamError) as exc:
                failures += 1
                if failures > reconnects:
                    raise ConnectionFailed(f"event stream of job {job_id} lost ({type(exc).__name__})") from exc
                await asyncio.sleep(min(5.0, 0.2 * 2**failures))

    # --- datasets -----------------------------------------------------------------------------------------

    async def create_dataset(
        self, name: str, examples: list[dict[str, str]], *, idempotency_key: str | None = None
    ) -> DatasetRead:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"name": name, "examples": examples}
        return DatasetRead.model_validate(await self.request("POST", "/v1/datasets", json=body, headers=headers))

    async def upload_dataset(self, path: str | Path, *, name: str | None = None) -> DatasetRead:
        """A JSON Lines file of {"input", "target"} objects."""
        path = Path(path)
        files = {"file": (path.name, path.read_bytes(), "application/x-ndjson")}
        data = {"name": name or path.stem}
        return DatasetRead.model_validate(await self.request("POST", "/v1/datasets", files=files, data=data))

    async def list_datasets(
        self, *, source: str = "uploaded", limit: int = 50, cursor: str | None = None
    ) -> DatasetPage:
        return await self._get(DatasetPage, "/v1/datasets", source=source, limit=limit, cursor=cursor)

    async def get_dataset(self, dataset_id: str, *, examples_limit: int = 0) -> DatasetRead:
        return await self._get(DatasetRead, f"/v1/datasets/{dataset_id}", examples_limit=examples_limit)

    # --- studies ------------------------------------------------------------------------------------------

    async def create_study(self, study: dict | BaseModel, *, idempotency_key: str | None = None) -> StudyRead:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return StudyRead.model_validate(await self.request("POST", "/v1/studies", json=_body(study), headers=headers))

    async def get_study(self, study_id: str) -> StudyRead:
        return await self._get(StudyRead, f"/v1/studies/{study_id}")

    async def list_studies(self, *, limit: int = 50, cursor: str | None = None) -> StudyPage:
        return await self._get(StudyPage, "/v1/studies", limit=limit, cursor=cursor)

    async def cancel_study(self, study_id: str) -> StudyRead:
        return StudyRead.model_validate(await self.request("POST", f"/v1/studies/{study_id}/cancel"))

    # --- the service --------------------------------------------------------------------------------------

    async def methods(self) -> list[MethodRead]:
        return [MethodRead.model_validate(m) for m in await self.request("GET", "/v1/methods")]

    async def backends(self) -> list[BackendRead]:
        return [BackendRead.model_validate(b) for b in await self.request("GET", "/v1/backends")]

    async def ready(self) -> bool:
        try:
            await self.request("GET", "/readyz")
        except PromptoptError:
            return False
        return True


async def _parse_sse(lines: AsyncIterator[str]) -> AsyncIterator[JobEvent]:
    event_id, kind, data = None, "message", []
    async for line in lines:
        if not line:
            if data:
                yield JobEvent(
                    id=None if event_id is None else int(event_id), event=kind, data=json.loads("\n".join(data))
                )
            event_id, kind, data = None, "message", []
        elif line.startswith(":"):
            continue  # keep-alive comment
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "event":
                kind = value
            elif name == "data":
                data.append(value)


class Client:
    """The same calls as `AsyncClient`, blocking; iterators (`iter_jobs`, `events`) become plain iterators.
    Runs its own event loop, so it cannot be used from inside a running one (use `AsyncClient` there)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, **kwargs) -> None:
        self._runner = asyncio.Runner()
        self._async = self._runner.run(_make_async(url, api_key, kwargs))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._async.aclose())
        self._runner.close()

    def __getattr__(self, name: str):
        target = getattr(self._async, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            result = target(*args, **kwargs)
            if hasattr(result, "__anext__"):
                return self._iterate(result)
            return self._runner.run(result)

        return call

    def _iterate(self, stream) -> Iterator:
        try:
            while True:
                try:
                    yield self._runner.run(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._runner.run(stream.aclose())


async def _make_async(url, api_key, kwargs) -> AsyncClient:
    return AsyncClient(url, api_key, **kwargs)
