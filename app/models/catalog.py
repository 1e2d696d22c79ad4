"""What an admin configures: upstream models with their prices, and the agents built on them."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from sqlalchemy import CheckConstraint, DateTime, Double, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.models import base
from app.models.base import SHORT_TEXT_CHARS, Base, Id, Money, created_at_column, id_column, updated_at_column

TIMEOUT_SECONDS_RANGE = (1, 3600)
"""An agent's `timeout_seconds`, checked by the table and by the API's body schema alike."""
DEFAULT_TIMEOUT_SECONDS = 120
TEMPERATURE_RANGE = (0, 2)
"""An agent's `temperature`, checked by the table and by the API's body schema alike."""
SYSTEM_PROMPT_MAX_CHARS = 200_000
"""An agent's `system_prompt`, checked by the API's body schema, which also sizes the admin routes' bodies by it."""
MAX_TOKENS_RANGE = (1, 1_000_000)
"""An agent's `max_tokens`, checked by the API's body schema."""


class LlmModel(Base):
    """`name` is ours and unique among live models; `model` is what the provider is asked for."""

    __tablename__ = "llm_models"
    __table_args__ = (
        CheckConstraint("input_price_per_1k >= 0", name="input_price_not_negative"),
        CheckConstraint("output_price_per_1k >= 0", name="output_price_not_negative"),
        CheckConstraint("context_window IS NULL OR context_window > 0", name="context_window_positive"),
        Index(
            "uq_llm_models_live_name",
            "name",
            unique=True,
            postgresql_where=text("deleted_at IS NULL"),
            sqlite_where=text("deleted_at IS NULL"),
        ),
    )

    id: Mapped[int] = id_column()
    name: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    model: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    base_url: Mapped[str | None] = mapped_column(String(base.LONG_TEXT_CHARS), nullable=True)
    api_key_env: Mapped[str | None] = mapped_column(String(SHORT_TEXT_CHARS), nullable=True)
    input_price_per_1k: Mapped[Decimal] = mapped_column(Money, nullable=False)
    output_price_per_1k: Mapped[Decimal] = mapped_column(Money, nullable=False)
    context_window: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()


class Agent(Base):
    """A system prompt bound to a primary model and an optional fallback."""

    __tablename__ = "agents"
    __table_args__ = (
        CheckConstraint("timeout_seconds BETWEEN {} AND {}".format(*TIMEOUT_SECONDS_RANGE), name="timeout_in_range"),
        CheckConstraint("max_tokens IS NULL OR max_tokens > 0", name="max_tokens_positive"),
        CheckConstraint("temperature IS NULL OR (temperature >= {} AND temperature <= {})".format(*TEMPERATURE_RANGE),
                        name="temperature_range"),
    )

    id: Mapped[int] = id_column()
    name: Mapped[str] = mapped_column(String(SHORT_TEXT_CHARS), nullable=False)
    system_prompt: Mapped[str] = mapped_column(Text, nullable=False)
    model_id: Mapped[int] = mapped_column(Id, ForeignKey("llm_models.id"), nullable=False)
    fallback_model_id: Mapped[int | None] = mapped_column(Id, ForeignKey("llm_models.id"), nullable=True)
    timeout_seconds: Mapped[int] = mapped_column(Integer, nullable=False,
                                                 server_default=text(str(DEFAULT_TIMEOUT_SECONDS)))
    temperature: Mapped[float | None] = mapped_column(Double, nullable=True)
    max_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()
