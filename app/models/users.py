"""People who call the API, and the ledger of every change to their credit."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, String, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import SHORT_TEXT_CHARS, Base, Id, Money, created_at_column, id_column, updated_at_column


class User(Base):
    """`balance` is settled credit; `reserved` is held by turns in flight (available = balance - reserved)."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        CheckConstraint("reserved >= 0", name="reserved_not_negative"),
    )

    id: Mapped[int] = id_column()
    name: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    api_key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    balance: Mapped[Decimal] = mapped_column(Money, nullable=False, server_default=text("0"))
    reserved: Mapped[Decimal] = mapped_column(Money, nullable=False, server_default=text("0"))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()

    @property
    def available_balance(self) -> Decimal:
        """What a new turn may still reserve: the balance less what turns in flight hold
        (`app.ledger.reserve` applies the same rule in SQL)."""
        return self.balance - self.reserved


class CreditTransaction(Base):
    """One row per change of a balance; a turn's charge is its row (`message_id`, unique: one at most)."""

    __tablename__ = "credit_transactions"
    __table_args__ = (
        CheckConstraint("kind IN ('credit', 'charge')", name="kind_known"),
        CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
        Index("idx_credit_transactions_user_id", "user_id", "id"),
    )

    id: Mapped[int] = id_column()
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), nullable=False)
    message_id: Mapped[int | None] = mapped_column(
        Id, ForeignKey("conversation_messages.id"), nullable=True, unique=True
    )
    kind: Mapped[str] = mapped_column(String(20), nullable=False)
    amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    balance_after: Mapped[Decimal] = mapped_column(Money, nullable=False)
    created_at: Mapped[datetime] = created_at_column()
