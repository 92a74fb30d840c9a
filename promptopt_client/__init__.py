"""Python client of the promptopt API.

from promptopt_client import Client

with Client("http://127.0.0.1:8000", api_key="po_...") as client:
    job = client.submit_job({"method": "opro", "task": {"dataset": "builtin:snli16"}, "params": {"preset": "small"}})
    job = client.wait(job.id, timeout=600)
    print(job.best.prompt, job.best.test_score)
"""

from app.webhooks.signing import verify as verify_signature
from promptopt_client.client import AsyncClient, Client, JobEvent
from promptopt_client.errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    NotFound,
    PayloadTooLarge,
    PromptoptError,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "JobEvent",
    "NotFound",
    "PayloadTooLarge",
    "PromptoptError",
    "RateLimited",
    "ServerError",
    "Unauthorized",
    "Unavailable",
    "verify_signature",
]
