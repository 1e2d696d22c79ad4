"""Messages that died with their retries exhausted, as the worker last saw them.

Dramatiq's Redis broker keeps a dead message's body as it was last enqueued, so the final attempt's
error and retry count exist only in the worker at the moment of the nack; this row keeps them, gives
the dead letter the integer id the API uses, and remembers a requeue even if Redis loses its data.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import SHORT_TEXT_CHARS, Base, Id, id_column, utc_now


class DeadLetter(Base):
    """One dead message; open while `requeued_at` is empty."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        Index("idx_dead_letters_open_by_time", "dead_at", "id", postgresql_where=text("requeued_at IS NULL"),
              sqlite_where=text("requeued_at IS NULL")),
        # An operator acts on a dead letter by its id, and a purge deletes the row: without AUTOINCREMENT,
        # SQLite gives the next dead letter the id of a purged last one, so a purge or requeue retried (or
        # sent from a stale list) would act on another message. PostgreSQL's identity never reuses one.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = id_column()
    redis_message_id: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    queue: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    actor: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    args: Mapped[list[Any]] = mapped_column(JSON, nullable=False)
    run_id: Mapped[int | None] = mapped_column(Id, nullable=True)
    """The turn's assistant message id, or the admin test run's id: the run this message drives."""
    retries: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    error: Mapped[str] = mapped_column(Text, nullable=False)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    dead_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utc_now,
                                              server_default=func.now())
    requeued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
