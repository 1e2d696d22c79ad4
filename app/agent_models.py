"""An agent's models: read as targets a worker can call, priced at their worst case."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import FromClause, Label
from sqlalchemy.orm import Session

from app.config import get_settings
from app.fallback import attempt_order
from app.model_target import MODEL_FIELDS, ModelTarget
from app.models import Agent, LlmModel
from app.token_estimates import most_tokens_of_messages


def target_of(model: LlmModel) -> ModelTarget:
    return ModelTarget(**{field: getattr(model, field) for field in MODEL_FIELDS})


PRIMARY, FALLBACK = "p", "f"
"""The prefixes of an agent's two models' columns in a query that reads both (`model_columns`)."""


def model_columns(model: FromClause, prefix: str) -> list[Label[Any]]:
    """A model's columns as a query that reads both of an agent's models names them: `<prefix>_<field>`."""
    return [model.c[field].label(f"{prefix}_{field}") for field in MODEL_FIELDS]


def target_in_row(row: Any, prefix: str) -> ModelTarget | None:
    """A model read by `model_columns`, as a turn's claim reads both of its agent's models in its lock query
    (`app.turn_state`); None when the row has none (an agent without a fallback)."""
    values = {field: getattr(row, f"{prefix}_{field}") for field in MODEL_FIELDS}
    return None if values["id"] is None else ModelTarget(**values)


def agent_targets(session: Session, agent: Agent) -> tuple[ModelTarget, ModelTarget | None]:
    """An agent's primary and fallback for a test run and the route test, loaded from their rows (a turn
    reads the same columns with its claim, `target_in_row`): the same targets, the same prices."""
    primary = target_of(session.get_one(LlmModel, agent.model_id))
    fallback = target_of(session.get_one(LlmModel, agent.fallback_model_id)) if agent.fallback_model_id else None
    return primary, fallback


def max_cost(target: ModelTarget, messages: list[dict[str, str]], max_tokens: int | None) -> Decimal:
    """The most a turn can cost on `target`: its prompt at the most a provider may count it (its UTF-8
    bytes, which the charge is capped at too) and an answer as long as allowed. Not the estimate (a token per
    four ASCII characters): a tokenizer may split punctuation or emoji into up to four times as many tokens,
    and a reservation below the charge would let a turn cost more than its user's balance."""
    return target.cost(most_tokens_of_messages(messages), get_settings().answer_limit(max_tokens))


def worst_case_cost(primary: ModelTarget, fallback: ModelTarget | None,
                    prompt_for: Callable[[ModelTarget], list[dict[str, str]]], max_tokens: int | None) -> Decimal:
    """What a turn reserves before calling a model: `max_cost` on the dearest of the models it may use."""
    return max(max_cost(t, prompt_for(t), max_tokens) for t in attempt_order(primary, fallback))
