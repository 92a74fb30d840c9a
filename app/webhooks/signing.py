"""Signatures: `Promptopt-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`. The timestamp in the
signed text lets a receiver refuse replays of an old delivery."""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Promptopt-Signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, tolerance_s: float = 300.0, now: float | None = None) -> bool:
    """Whether `header` signs `body` with `secret`, at most `tolerance_s` seconds ago."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(fields["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), f"t={timestamp},v1={fields.get('v1', '')}")
