from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime, utcnow


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(sa.String(64), default="default", index=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    n_examples: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class DatasetExample(Base):
    """One example of an uploaded dataset, `position` counting from 0 in upload order. A row each (not one JSON
    value for the dataset), so an upload is written and a dataset read a bounded chunk at a time."""

    __tablename__ = "dataset_examples"

    dataset_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    input: Mapped[str] = mapped_column(sa.Text)
    target: Mapped[str] = mapped_column(sa.Text)
