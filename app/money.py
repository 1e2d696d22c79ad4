"""Money arithmetic: six decimal places, rounded half-up, rendered as a string; never a float."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from app.config import MONEY_QUANTUM

_THOUSAND = Decimal(1000)
MAX_AMOUNT = Decimal("999999999999.999999")
"""The largest amount NUMERIC(18, 6) holds."""


def quantize(amount: Decimal | int | str) -> Decimal:
    return Decimal(amount).quantize(MONEY_QUANTUM, rounding=ROUND_HALF_UP)


def render(amount: Decimal | None) -> str | None:
    """The contract's money format, e.g. "12.340000"."""
    return None if amount is None else f"{quantize(amount):f}"


def token_cost(
    prompt_tokens: int, completion_tokens: int, input_price_per_1k: Decimal, output_price_per_1k: Decimal
) -> Decimal:
    """What a model's prices make of a usage report."""
    raw = (Decimal(prompt_tokens) * Decimal(input_price_per_1k)
           + Decimal(completion_tokens) * Decimal(output_price_per_1k)) / _THOUSAND
    return quantize(raw)
