"""Idempotent submission: a client's `Idempotency-Key` makes a retried POST return the original answer."""
