"""Money arithmetic: six decimal places, rounded half-up, rendered as a string; never a float."""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal

MONEY_QUANTUM = Decimal("0.000001")
MILLIONTHS = int(1 / MONEY_QUANTUM)
"""Quanta in a unit of credit: money is stored as a whole number of them where the database has no exact
decimal (SQLite, `app.models.base.Millionths`)."""
_THOUSAND = Decimal(1000)
MAX_AMOUNT = Decimal("999999999999.999999")
"""The largest amount NUMERIC(18, 6) holds."""


_WRITTEN_AMOUNT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)")


def written_plainly(text: str) -> str:
    """An amount typed by a person or a program, as plain ASCII digits with an optional sign and point.
    Python's `Decimal` also reads `5_000` (5000), other scripts' digits (Arabic-Indic ten is 10) and exponents: a
    typo like `5_00` credited 500."""
    if not _WRITTEN_AMOUNT.fullmatch(text):
        raise ValueError(f"an amount is written with the digits 0-9, an optional sign and decimal point, not {text!r}")
    return text


def checked_balance(amount: Decimal) -> Decimal:
    """A balance as an account is opened with, from the API or the command line: finite, not negative,
    at most six decimals (never rounded: a user is credited what was typed), within NUMERIC(18, 6)."""
    if not amount.is_finite() or amount < 0 or amount > MAX_AMOUNT or amount != amount.quantize(MONEY_QUANTUM):
        raise ValueError(f"a balance must be between 0 and {MAX_AMOUNT}, with at most 6 decimals, not "
                         f"{_as_written(amount)}")
    return amount


def _as_written(amount: Decimal) -> str:
    """An amount as a person writes it (0.0000001, where `str` gives 1E-7), unless it would run to more digits
    than anyone typed: a huge or tiny exponent is left in its exponent form."""
    return f"{amount:f}" if amount.is_finite() and -30 <= amount.adjusted() <= 30 else str(amount)


def quantize(amount: Decimal | int | str) -> Decimal:
    return Decimal(amount).quantize(MONEY_QUANTUM, rounding=ROUND_HALF_UP)


def render(amount: Decimal | None) -> str | None:
    """The contract's money format, e.g. "12.340000"."""
    return None if amount is None else f"{quantize(amount):f}"


def token_cost(
    prompt_tokens: int, completion_tokens: int, input_price_per_1k: Decimal, output_price_per_1k: Decimal
) -> Decimal:
    """What a model's prices make of a usage report, at most `MAX_AMOUNT`: no balance holds more, and a
    worst case or an answer's cost beyond what a money column stores failed the worker's write on every
    delivery (a model priced near the bound, an agent allowed a million tokens)."""
    raw = (Decimal(prompt_tokens) * Decimal(input_price_per_1k)
           + Decimal(completion_tokens) * Decimal(output_price_per_1k)) / _THOUSAND
    return min(quantize(raw), MAX_AMOUNT)
