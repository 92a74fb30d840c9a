"""Webhooks: a job (or its tenant's default) names a URL to be told of its end (and optionally each step);
deliveries are signed, retried with backoff and logged."""
