"""Per-tenant rate limits and quotas: 429 with Retry-After when one is reached."""
