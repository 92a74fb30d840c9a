"""Keyset pagination with opaque cursors: one way to page every list in the API."""

from __future__ import annotations

import base64
import json
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession


def encode_cursor(*values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, default=str).encode()).decode()


def decode_cursor(cursor: str) -> list:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except ValueError as exc:
        raise ValueError("malformed cursor") from exc
    if not isinstance(values, list):
        raise ValueError("malformed cursor")
    return values


async def newest_first(session: AsyncSession, query, model, *, limit: int, cursor: str | None):
    """Rows of `query` ordered by (created_at, id) descending, `limit` at a time; returns (rows, next cursor)."""
    if cursor:
        try:
            created, row_id = decode_cursor(cursor)
            created_at = datetime.fromisoformat(created)
        except (TypeError, ValueError) as exc:
            raise ValueError("malformed cursor") from exc
        query = query.where(
            sa.or_(model.created_at < created_at, sa.and_(model.created_at == created_at, model.id < row_id))
        )
    query = query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = list((await session.execute(query)).scalars())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at.isoformat(), rows[-1].id)
    return rows, next_cursor
