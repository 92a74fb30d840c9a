"""Prometheus metrics (GET /metrics)."""

from prometheus_client import Counter, Gauge, Histogram

JOBS_SUBMITTED = Counter("promptopt_jobs_submitted_total", "Jobs accepted by the API", ["method"])
HTTP_LATENCY = Histogram(
    "promptopt_http_request_seconds", "API latency", ["route", "method"], buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2)
)

# Worker side (served by the API's /metrics in embedded mode, by the worker's own port otherwise).
ATTEMPTS = Counter("promptopt_job_attempts_total", "Job attempts started", ["resumed"])
ATTEMPTS_ENDED = Counter(
    "promptopt_job_attempts_ended_total", "Job attempts that ended without finishing the job, by cause", ["cause"]
)
RETRIES = Counter("promptopt_job_retries_total", "Jobs scheduled for another attempt, by cause", ["cause"])
LEASE_LOSSES = Counter("promptopt_lease_losses_total", "Attempts stopped because their lease was lost")
STALLED = Counter("promptopt_stalled_attempts_total", "Attempts ended for making no progress")
BACKEND_UP = Gauge("promptopt_backend_up", "1 while the backend's circuit breaker is closed", ["backend"])
BACKEND_TRIPS = Counter("promptopt_backend_trips_total", "Times a backend's circuit breaker opened", ["backend"])
