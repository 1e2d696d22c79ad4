"""Turning a configured model into something a worker can call, and pricing its worst case."""

from __future__ import annotations

from decimal import Decimal

from app.config import get_settings
from app.llm_client import ModelTarget, estimate_tokens_of_messages
from app.models import LlmModel


def target_of(model: LlmModel) -> ModelTarget:
    return ModelTarget(
        id=model.id, name=model.name, model=model.model, base_url=model.base_url, api_key_env=model.api_key_env,
        input_price_per_1k=model.input_price_per_1k, output_price_per_1k=model.output_price_per_1k,
        context_window=model.context_window,
    )


def max_cost(target: ModelTarget, messages: list[dict[str, str]], max_tokens: int | None) -> Decimal:
    """The most a turn can cost on `target`: its estimated prompt and an answer as long as allowed."""
    answer = max_tokens or get_settings().default_max_tokens
    return target.cost(estimate_tokens_of_messages(messages), answer)
