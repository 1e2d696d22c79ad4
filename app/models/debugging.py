"""Admin test runs of an agent and every upstream attempt, so testing and provider costs are visible."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import SHORT_TEXT_CHARS, Base, Id, Money, created_at_column, id_column, updated_at_column
from app.models.conversations import ALL_STATUSES_SQL


class DebugRun(Base):
    """An admin's execution test: runs like a turn, never touches a balance."""

    __tablename__ = "admin_debug_logs"
    __table_args__ = (
        CheckConstraint(ALL_STATUSES_SQL, name="status_known"),
        Index("idx_admin_debug_logs_agent_id", "agent_id", "id"),
        Index("idx_admin_debug_logs_status", "status"),
    )

    id: Mapped[int] = id_column()
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), nullable=False)
    admin_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), nullable=False)
    status: Mapped[str] = mapped_column(String(30), nullable=False, server_default=text("'pending'"))
    input: Mapped[str] = mapped_column(Text, nullable=False)
    output: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("''"))
    model: Mapped[str | None] = mapped_column(String(SHORT_TEXT_CHARS), nullable=True)
    model_id: Mapped[int | None] = mapped_column(Id, ForeignKey("llm_models.id"), nullable=True)
    """The model that answered, by id: the cost analysis groups by it (a model's name can change or recur)."""
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost: Mapped[Decimal | None] = mapped_column(Money, nullable=True)
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    handed_back: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    """How many of its deliveries since its last requeue a worker's graceful stop handed back (`LeaseKeeper.hand_back`):
    they do not count against `AGENTQ_MAX_DELIVERIES` (`app.deliveries.give_up_reason`), which is for runs that
    keep killing or stalling their workers, not for a rolling restart; the run's deadline still bounds them."""
    fell_back: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    """The run switched to its agent's fallback model, in a delivery since its last requeue: a delivery that
    takes it over calls the fallback alone, since a run switches once (`app.run_kinds.RunKind.mark_fell_back`)."""
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class ModelAttempt(Base):
    """One call to one upstream model, failed ones included: the provider's cost and failure rate."""

    __tablename__ = "model_attempts"
    __table_args__ = (Index("idx_model_attempts_model_created", "model_name", "created_at"),)

    id: Mapped[int] = id_column()
    message_id: Mapped[int | None] = mapped_column(
        Id, ForeignKey("conversation_messages.id"), nullable=True, index=True
    )
    debug_log_id: Mapped[int | None] = mapped_column(
        Id, ForeignKey("admin_debug_logs.id"), nullable=True, index=True
    )
    model_name: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    outcome: Mapped[str] = mapped_column(String(30), nullable=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    latency_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    first_token_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost: Mapped[Decimal | None] = mapped_column(Money, nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    delivery: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The delivery of its run that made it (`deliveries` at its claim): a stream reader names the final text
    by the settling delivery's attempts alone, not by those an earlier delivery recorded without settling."""
