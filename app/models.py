"""Every table, imported in one place for Alembic and for tests."""

from app.cache.models import EvalCacheEntry
from app.datasets.models import Dataset, DatasetExample
from app.db import Base
from app.idempotency.models import IdempotencyRecord
from app.jobs.models import Candidate, CandidateEvaluation, Checkpoint, Job, JobEvent
from app.keys.models import ApiKey
from app.studies.models import Study
from app.webhooks.models import WebhookDelivery

__all__ = [
    "ApiKey",
    "Base",
    "Candidate",
    "CandidateEvaluation",
    "Checkpoint",
    "Dataset",
    "DatasetExample",
    "EvalCacheEntry",
    "IdempotencyRecord",
    "Job",
    "JobEvent",
    "Study",
    "WebhookDelivery",
]
