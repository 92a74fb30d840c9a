from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Study(Base):
    """A set of jobs (arms x seeds) on one task; its jobs carry `study_id`. Progress and the leaderboard are
    computed from them when read."""

    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(64), index=True)
    name: Mapped[str | None] = mapped_column(sa.String(200))
    # The study as submitted (validated, defaults filled in).
    spec: Mapped[dict] = mapped_column(sa.JSON)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    __table_args__ = (sa.Index("ix_studies_created_at_id", "created_at", "id"),)
