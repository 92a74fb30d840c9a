"""API keys -> tenant. With no keys configured the service is open (single tenant "default").

PROMPTOPT_API_KEYS='["team-a:secret1", "secret2"]' — `tenant:key`, or a bare key for tenant "default".
"""

from __future__ import annotations

import hmac

from fastapi import Request

from app.errors import Unauthorized
from app.settings import Settings


def tenant_of(request: Request, settings: Settings) -> str:
    if not settings.api_keys:
        return "default"
    header = request.headers.get("authorization", "")
    presented = header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
    for entry in settings.api_keys:
        tenant, _, key = entry.rpartition(":")
        if presented and hmac.compare_digest(presented.encode(), key.encode()):
            return tenant or "default"
    raise Unauthorized("missing or invalid API key (Authorization: Bearer <key> or X-API-Key)")
