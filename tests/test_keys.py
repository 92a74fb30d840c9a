"""API keys as records: created with the CLI (shown once, stored hashed), roles, revocation, env keys alongside."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from app.main import create_app
from app.migrate import upgrade_async
from app.settings import ApiSettings, Settings
from tests.conftest import PG_ADMIN


@pytest.fixture
async def keys_database() -> AsyncIterator[str]:
    """A database of its own: an active stored key closes the service to keyless callers, which other tests are."""
    name = f"promptopt_keys_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + "/" + name
    await upgrade_async(url)
    yield url
    conn = await asyncpg.connect(PG_ADMIN)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


async def keys_cli(database_url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "PROMPTOPT_DATABASE_URL": database_url}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptopt", "keys", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def create_key(database_url: str, *args: str) -> str:
    code, out, err = await keys_cli(database_url, "create", *args)
    assert code == 0, err
    return out.strip().splitlines()[-1]


def keyed_app(settings: Settings, database_url: str, **overrides):
    return create_app(
        settings.model_copy(update={"database_url": database_url, "api": ApiSettings(key_cache_seconds=0), **overrides})
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_stored_keys_select_tenant_and_role_and_revocation(settings, keys_database):
    app = keyed_app(settings, keys_database)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            # No key anywhere: open, one tenant.
            assert (await client.get("/v1/jobs")).status_code == 200

            team_key = await create_key(keys_database, "--tenant", "team-a", "--name", "ci")
            admin_key = await create_key(keys_database, "--tenant", "ops", "--admin")
            assert team_key.startswith("po_") and team_key != admin_key

            # Only the hash is stored.
            conn = await asyncpg.connect(keys_database.replace("postgresql+asyncpg://", "postgresql://"))
            rows = [dict(r) for r in await conn.fetch("SELECT * FROM api_keys")]
            await conn.close()
            assert team_key not in json.dumps(rows, default=str)
            assert hashlib.sha256(team_key.encode()).hexdigest() in {r["key_hash"] for r in rows}

            # A stored key exists now, so the keyless caller is refused.
            refused = await client.get("/v1/jobs")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
            assert (await client.get("/v1/jobs", headers=bearer("po_not-a-key"))).status_code == 401

            body = {"name": "private", "examples": [{"input": "a", "target": "b"}]}
            created = await client.post("/v1/datasets", json=body, headers={"X-API-Key": team_key})
            assert created.status_code == 201 and created.json()["tenant"] == "team-a"

            # Cross-tenant listing is for admins only.
            forbidden = await client.get("/v1/datasets", params={"tenant": "*"}, headers=bearer(team_key))
            assert forbidden.status_code == 403
            own = await client.get("/v1/datasets", headers=bearer(admin_key))
            assert own.json()["items"] == []  # the admin's own tenant has none
            every = await client.get("/v1/datasets", params={"tenant": "*"}, headers=bearer(admin_key))
            assert [d["tenant"] for d in every.json()["items"]] == ["team-a"]
            one = await client.get("/v1/jobs", params={"tenant": "team-a"}, headers=bearer(admin_key))
            assert one.status_code == 200

            code, out, _ = await keys_cli(keys_database, "list", "--tenant", "team-a", "--json")
            listed = json.loads(out)
            assert code == 0 and [k["name"] for k in listed] == ["ci"] and listed[0]["revoked_at"] is None
            assert team_key not in out and team_key.startswith(listed[0]["prefix"])

            code, out, _ = await keys_cli(keys_database, "revoke", listed[0]["prefix"])
            assert code == 0 and "revoked" in out
            assert (await client.get("/v1/jobs", headers=bearer(team_key))).status_code == 401
            assert (await client.get("/v1/jobs", headers=bearer(admin_key))).status_code == 200
            code, _, _ = await keys_cli(keys_database, "revoke", listed[0]["prefix"])
            assert code == 1  # nothing active left under that prefix


async def test_env_keys_work_beside_stored_keys(settings, keys_database):
    stored = await create_key(keys_database, "--tenant", "team-b")
    app = keyed_app(settings, keys_database, api_keys=["team-env:env-secret"])
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"name": "d", "examples": [{"input": "a", "target": "b"}]}
            by_env = await client.post("/v1/datasets", json=body, headers=bearer("env-secret"))
            by_record = await client.post("/v1/datasets", json=body, headers=bearer(stored))
            assert by_env.json()["tenant"] == "team-env" and by_record.json()["tenant"] == "team-b"
            assert (await client.get("/v1/jobs")).status_code == 401
