"""Who is calling: an API key (from the environment or a stored record) to a tenant and a role.

With no key configured anywhere the service is open: every caller is tenant "default".
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

from app.db import Database
from app.errors import Unauthorized
from app.keys.models import ApiKey
from app.keys.repository import ApiKeyRepository

KEY_PREFIX = "po_"
ROLES = ("user", "admin")
# Lookups remembered per process, so a key costs one query per `cache_seconds`, not one per request.
MAX_CACHED_LOOKUPS = 10_000


@dataclass(frozen=True)
class Principal:
    tenant: str
    # Admins may list every tenant's jobs and datasets.
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(tenant: str, *, name: str | None = None, role: str = "user") -> tuple[ApiKey, str]:
    """A new key record and the key itself (shown once; only its hash is stored)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(
        id=str(uuid.uuid4()), tenant=tenant, name=name, prefix=key[: len(KEY_PREFIX) + 8], key_hash=hash_key(key)
    )
    record.role = role
    return record, key


def presented_key(authorization: str | None, x_api_key: str | None) -> str:
    header = authorization or ""
    return header[7:].strip() if header.lower().startswith("bearer ") else (x_api_key or "")


class KeyChecker:
    def __init__(self, db: Database, env_keys: list[str], cache_seconds: float) -> None:
        self.db = db
        # PROMPTOPT_API_KEYS entries: `tenant:key`, or a bare key for tenant "default".
        self.env_keys = [(tenant or "default", key) for tenant, _, key in (e.rpartition(":") for e in env_keys)]
        self.cache_seconds = cache_seconds
        self._lookups: dict[str, tuple[float, Principal | None]] = {}
        self._stored_keys_exist: tuple[float, bool] | None = None

    async def principal(self, presented: str) -> Principal:
        if presented:
            for tenant, key in self.env_keys:
                if hmac.compare_digest(presented.encode(), key.encode()):
                    return Principal(tenant)
            found = await self._stored(presented)
            if found is not None:
                return found
        if not self.env_keys and not await self._any_stored_key():
            return Principal("default")
        raise Unauthorized("missing or invalid API key (Authorization: Bearer <key> or X-API-Key)")

    async def _stored(self, presented: str) -> Principal | None:
        digest = hash_key(presented)
        now = time.monotonic()
        cached = self._lookups.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self.db.transaction() as session:
            record = await ApiKeyRepository(session).active_by_hash(digest)
        found = None if record is None else Principal(record.tenant, admin=record.role == "admin")
        if len(self._lookups) >= MAX_CACHED_LOOKUPS:
            self._lookups.clear()
        self._lookups[digest] = (now + self.cache_seconds, found)
        return found

    async def _any_stored_key(self) -> bool:
        now = time.monotonic()
        if self._stored_keys_exist is not None and self._stored_keys_exist[0] > now:
            return self._stored_keys_exist[1]
        async with self.db.transaction() as session:
            exists = await ApiKeyRepository(session).any_active()
        self._stored_keys_exist = (now + self.cache_seconds, exists)
        return exists
