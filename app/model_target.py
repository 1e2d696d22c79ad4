"""A model as a run calls it: a snapshot of its `llm_models` row, with its prices.

Kept apart from `app.llm_client` (which loads the openai SDK) so that what only reads or prices models,
the claim and the dead-letter commands among them, does not load it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal

from app.money import token_cost


@dataclass(frozen=True, slots=True)
class ModelTarget:
    """A snapshot of an `llm_models` row, safe to use outside the transaction that read it."""

    id: int
    name: str
    model: str
    base_url: str | None
    api_key_env: str | None
    input_price_per_1k: Decimal
    output_price_per_1k: Decimal
    context_window: int | None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> Decimal:
        return token_cost(prompt_tokens, completion_tokens, self.input_price_per_1k, self.output_price_per_1k)


MODEL_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ModelTarget))
"""The `llm_models` columns a `ModelTarget` holds, under the same names."""
