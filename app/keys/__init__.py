"""API keys as records: stored hashed, managed with `promptopt keys`, checked on every request."""
