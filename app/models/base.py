"""Declarative base shared by every table, with the naming rules `schema.sql` follows."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Dialect,
    Identity,
    Integer,
    MetaData,
    Numeric,
    TypeDecorator,
    func,
    type_coerce,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.money import MILLIONTHS, MONEY_QUANTUM, quantize

NAMING_CONVENTION = {
    "pk": "pk_%(table_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "ix": "ix_%(table_name)s_%(column_0_name)s",
}


class Millionths(TypeDecorator[Decimal]):
    """Money on SQLite: whole millionths in an INTEGER column. SQLite has no exact decimal: a NUMERIC column
    holds a binary float there, and the arithmetic of a charge or a reservation, done by SQLite inside the
    statement, drifted by 1e-16 (a balance that should equal a turn's worst case fell just short of it, a
    released reservation left 3e-17 held). Whole numbers add and subtract exactly."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(quantize(value) * MILLIONTHS)

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(int(value)) * MONEY_QUANTUM


def money_total_parts(amounts: ColumnElement[Decimal], dialect: Dialect) -> tuple[ColumnElement[Any], ...]:
    """The aggregate columns of an exact SUM of a money column, to be read with `money_total`. On SQLite the
    millionths are summed in two parts, whole credits and the rest: SQLite's SUM of 64-bit integers fails with
    an overflow past 9.2e12 credits, which ten runs at the highest price reach, and its TOTAL is a float."""
    if dialect.name != "sqlite":
        return (func.coalesce(func.sum(amounts), 0),)
    millionths = type_coerce(amounts, BigInteger)
    return (func.coalesce(func.sum(millionths // MILLIONTHS), 0), func.coalesce(func.sum(millionths % MILLIONTHS), 0))


def money_total(parts: Sequence[Any]) -> Decimal:
    """The total the columns of `money_total_parts` give."""
    if len(parts) == 1:
        return Decimal(parts[0])
    whole, rest = parts
    return Decimal(int(whole)) + Decimal(int(rest)) * MONEY_QUANTUM


Money = Numeric(18, 6, asdecimal=True).with_variant(Millionths(), "sqlite")
"""Every amount of credit: balances, prices per 1k tokens, costs. Never a float: NUMERIC(18, 6) on
PostgreSQL, millionths on SQLite."""

Id = BigInteger().with_variant(Integer, "sqlite")
"""64-bit ids on PostgreSQL; SQLite only auto-increments an INTEGER primary key."""
SHORT_TEXT_CHARS = 200
"""The length of every short text column: names, model ids, variable names, idempotency keys, queue and actor
names. The API's body schemas refuse longer ones with a 422 rather than let the database refuse them."""
LONG_TEXT_CHARS = 500
"""The length of the longer text columns: a conversation's title, a model's base URL; refused past it as a short
text is."""
LARGEST_ID = 2**63 - 1
"""The largest id a column of `Id` holds (a BIGINT; SQLite's INTEGER is as wide): an id past it is refused
where it comes in, rather than failing its query (`bigint out of range`)."""


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {Decimal: Money}


def id_column() -> Mapped[int]:
    return mapped_column(Id, Identity(), primary_key=True)


def utc_now() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """Every stored time is UTC, but SQLite hands them back naive."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def optional_utc(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)


def iso_utc(moment: datetime) -> str:
    """The contract's time format: ISO 8601 in UTC with a Z."""
    return as_utc(moment).isoformat().replace("+00:00", "Z")


def created_at_column() -> Mapped[datetime]:
    """Set by the application clock so SQLite and PostgreSQL store comparable values."""
    return mapped_column(DateTime(timezone=True), nullable=False, default=utc_now, server_default=func.now())


def updated_at_column() -> Mapped[datetime]:
    return mapped_column(
        DateTime(timezone=True), nullable=False, default=utc_now, server_default=func.now(), onupdate=utc_now
    )
