"""Turning a configured model into something a worker can call, and pricing its worst case."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

from sqlalchemy.orm import Session

from app.config import get_settings
from app.llm_client import ModelTarget, estimate_tokens_of_messages
from app.models import Agent, LlmModel


def target_of(model: LlmModel) -> ModelTarget:
    return ModelTarget(
        id=model.id, name=model.name, model=model.model, base_url=model.base_url, api_key_env=model.api_key_env,
        input_price_per_1k=model.input_price_per_1k, output_price_per_1k=model.output_price_per_1k,
        context_window=model.context_window,
    )


def agent_targets(session: Session, agent: Agent) -> tuple[ModelTarget, ModelTarget | None]:
    """An agent's primary and fallback, loaded the one way so a test run and a route test agree with a turn."""
    primary = target_of(session.get_one(LlmModel, agent.model_id))
    fallback = target_of(session.get_one(LlmModel, agent.fallback_model_id)) if agent.fallback_model_id else None
    return primary, fallback


def max_cost(target: ModelTarget, messages: list[dict[str, str]], max_tokens: int | None) -> Decimal:
    """The most a turn can cost on `target`: its estimated prompt and an answer as long as allowed."""
    answer = max_tokens or get_settings().default_max_tokens
    return target.cost(estimate_tokens_of_messages(messages), answer)


def worst_case_cost(
    targets: list[ModelTarget], prompt_for: Callable[[ModelTarget], list[dict[str, str]]], max_tokens: int | None
) -> Decimal:
    """What a turn reserves before calling a model: `max_cost` on the dearest of the models it may use."""
    return max(max_cost(t, prompt_for(t), max_tokens) for t in targets)
