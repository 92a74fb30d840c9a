"""Prometheus metrics (GET /metrics)."""

from prometheus_client import Counter, Histogram

JOBS_SUBMITTED = Counter("promptopt_jobs_submitted_total", "Jobs accepted by the API", ["method"])
HTTP_LATENCY = Histogram(
    "promptopt_http_request_seconds", "API latency", ["route", "method"], buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2)
)
