"""Conversations, their messages, and the turn bookkeeping the workers act on."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.models import base
from app.models.base import SHORT_TEXT_CHARS, Base, Id, Money, created_at_column, id_column, updated_at_column
from app.turn_status import IN_FLIGHT_VALUES, TurnStatus


def _status_in(statuses: Iterable[str]) -> str:
    return "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


IN_FLIGHT_SQL = _status_in(IN_FLIGHT_VALUES)
ALL_STATUSES_SQL = _status_in(s.value for s in TurnStatus)


class Conversation(Base):
    """`message_count` doubles as the sequence allocator: a turn takes seq n and n+1 by adding 2 to it."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index(
            "idx_conversations_listing",
            "user_id",
            "updated_at",
            "id",
            postgresql_where=text("deleted_at IS NULL AND last_success_at IS NOT NULL"),
            sqlite_where=text("deleted_at IS NULL AND last_success_at IS NOT NULL"),
        ),
        Index("idx_conversations_dedup", "user_id", "agent_id", "created_at"),
    )

    id: Mapped[int] = id_column()
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), nullable=False)
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), nullable=False)
    project_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    title: Mapped[str | None] = mapped_column(String(base.LONG_TEXT_CHARS), nullable=True)
    message_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class ConversationMessage(Base):
    """Both messages of a turn carry its status; the partial unique index refuses a second turn in flight."""

    __tablename__ = "conversation_messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_conversation_messages_seq"),
        CheckConstraint("role IN ('user', 'assistant')", name="role_known"),
        CheckConstraint(ALL_STATUSES_SQL, name="status_known"),
        Index("idx_conversation_messages_status", "status"),
        Index("idx_conversation_messages_role_status_updated", "role", "status", "updated_at"),
        Index(
            "uq_conversation_messages_in_flight",
            "conversation_id",
            unique=True,
            postgresql_where=text(f"role = 'assistant' AND {IN_FLIGHT_SQL}"),
            sqlite_where=text(f"role = 'assistant' AND {IN_FLIGHT_SQL}"),
        ),
    )

    id: Mapped[int] = id_column()
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"), nullable=False)
    seq: Mapped[int] = mapped_column(Integer, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("''"))
    status: Mapped[str] = mapped_column(String(30), nullable=False, server_default=text("'pending'"))
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    model: Mapped[str | None] = mapped_column(String(SHORT_TEXT_CHARS), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    total_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost: Mapped[Decimal | None] = mapped_column(Money, nullable=True)
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class Turn(Base):
    """Worker-side state of one turn, keyed by its assistant message (whose status is the turn's status).

    `lease_token`/`lease_expires_at` say which worker owns the turn and until when; a worker whose lease
    was taken over can no longer write. `deadline_at` is when the run has outrun every model attempt it
    could make (timeout for each model, plus the grace), set by its first delivery since its last requeue
    and kept by the later ones: recovery revokes a delivery still going then.
    `enqueued_at` is the outbox mark: NULL means the Dramatiq message may never have been sent, so
    recovery sends it; otherwise it names the message its send was (`app.dispatch.message_id`), whose
    receipt in Redis recovery looks for.
    """

    __tablename__ = "turns"
    __table_args__ = (
        Index(
            "uq_turns_idempotency_key",
            "user_id",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
        Index("idx_turns_user_id", "user_id"),
    )

    assistant_message_id: Mapped[int] = mapped_column(
        Id, ForeignKey("conversation_messages.id"), primary_key=True
    )
    user_message_id: Mapped[int] = mapped_column(
        Id, ForeignKey("conversation_messages.id"), nullable=False, unique=True
    )
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"), nullable=False)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), nullable=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(SHORT_TEXT_CHARS), nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deliveries: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    handed_back: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    """How many of its deliveries since its last requeue a worker's graceful stop handed back (`LeaseKeeper.hand_back`):
    they do not count against `AGENTQ_MAX_DELIVERIES` (`app.deliveries.give_up_reason`), which is for runs that
    keep killing or stalling their workers, not for a rolling restart; the run's deadline still bounds them."""
    reserved_amount: Mapped[Decimal] = mapped_column(Money, nullable=False, server_default=text("0"))
    cost_estimated: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    fell_back: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    """The run switched to its agent's fallback model, in a delivery since its last requeue: a delivery that
    takes it over calls the fallback alone, since a run switches once (`app.run_kinds.RunKind.mark_fell_back`)."""
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()
