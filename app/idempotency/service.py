"""Replaying or refusing a POST by its `Idempotency-Key`.

The record is written in the same transaction as what the POST creates, so a key is answered for exactly when its
job (or dataset) exists. Two requests racing with one key: the second's commit fails on the primary key, and it
then answers from the first's record like any later replay."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError

from app.db import Database
from app.errors import Conflict
from app.idempotency.repository import IdempotencyRepository

MAX_KEY_LENGTH = 200

# The header a POST route takes to be retry-safe.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=MAX_KEY_LENGTH,
        description="Retry-safe submission: a repeat with the same key and body returns the original answer "
        "(and creates nothing); the same key with another body is a 409.",
    ),
]


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def request_hash(body: Any) -> str:
    return hashlib.sha256(_dumps(body).encode()).hexdigest()


def streamed_request_hash(fields: dict[str, Any], key: str, items: Iterable[Any], batch: int = 1_000) -> str:
    """`request_hash` of `{**fields, key: list(items)}`, hashing `items` as they come (a large upload's examples
    are never all in memory): the bytes hashed are those `json.dumps` writes for the whole body."""
    digest = hashlib.sha256(b"{")
    for n, name in enumerate(sorted([*fields, key])):
        digest.update(f"{', ' if n else ''}{_dumps(name)}: ".encode())
        if name != key:
            digest.update(_dumps(fields[name]).encode())
            continue
        digest.update(b"[")
        for i, some in enumerate(_batches(items, batch)):
            digest.update(f"{', ' if i else ''}{', '.join(map(_dumps, some))}".encode())
        digest.update(b"]")
    digest.update(b"}")
    return digest.hexdigest()


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    rest = iter(items)
    while some := list(itertools.islice(rest, size)):
        yield some


async def replay(db: Database, tenant: str, route: str, key: str, body_hash: str) -> JSONResponse | None:
    """The stored answer for this key, or None if the key is new; 409 if it was used with another body."""
    async with db.transaction() as session:
        record = await IdempotencyRepository(session).get(tenant, route, key)
    if record is None:
        return None
    if record.request_hash != body_hash:
        raise Conflict(f"Idempotency-Key {key!r} was already used with a different request body")
    return JSONResponse(record.response, status_code=record.status_code, headers={"Idempotent-Replayed": "true"})


async def create_once(
    db: Database,
    tenant: str,
    route: str,
    key: str | None,
    body: Any,
    create: Callable[[Any], Awaitable[tuple[int, dict]]],
    *,
    body_hash: str | None = None,
) -> tuple[JSONResponse | None, dict | None]:
    """Run `create(session) -> (status, response body)` in one transaction, recording the answer under `key`.
    Returns (a replayed response, None) when the key was seen before, else (None, the new response body).
    `body_hash`: the body's `request_hash` when the caller computed it (then `body` is not read)."""
    if body_hash is None:
        body_hash = request_hash(body) if key is not None else ""
    if key is not None:
        replayed = await replay(db, tenant, route, key, body_hash)
        if replayed is not None:
            return replayed, None
    try:
        async with db.transaction() as session:
            status, response = await create(session)
            if key is not None:
                await IdempotencyRepository(session).put(tenant, route, key, body_hash, status, response)
    except IntegrityError:
        if key is None:
            raise
        replayed = await replay(db, tenant, route, key, body_hash)  # the racing request won: answer as it did
        if replayed is None:
            raise
        return replayed, None
    return None, response
