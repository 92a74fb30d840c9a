from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class EvalCacheEntry(Base):
    """A deterministic LLM answer, keyed by sha256(model id, request kind, request, decoding params)."""

    __tablename__ = "eval_cache"

    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(sa.String(200))
    value: Mapped[dict] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
