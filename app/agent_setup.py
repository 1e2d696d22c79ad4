"""An agent as a run calls it: its models, its call parameters and the prompt each model is sent.

A user's turn, an admin's test run and the route test must call an agent's models the same way (a test
run keeps a turn's timeout, fallback and prompt rules), so each builds one `AgentSetup`: a turn from
the columns its claim read under its lock (`app.turn_runner`), the others from the agent's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, FromClause
from sqlalchemy.orm import Session

from app.agent_models import FALLBACK, PRIMARY, agent_targets, model_columns, target_in_row, worst_case_cost
from app.model_target import ModelTarget
from app.models import Agent
from app.prompt import ChatMessage, Prompt, build_prompt


@dataclass(frozen=True, slots=True)
class AgentParams:
    """What every call of the agent's models is sent with (and bounded by)."""

    timeout_seconds: float
    temperature: float | None
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class AgentSetup:
    system_prompt: str
    params: AgentParams
    primary: ModelTarget
    fallback: ModelTarget | None

    def prompt_for(self, target: ModelTarget, history: list[ChatMessage], content: str) -> Prompt:
        """What `target` is sent: the prompt trimmed to its own context window."""
        return build_prompt(self.system_prompt, history, content, context_window=target.context_window,
                            max_tokens=self.params.max_tokens)

    def worst_case_cost(self, history: list[ChatMessage], content: str) -> Decimal:
        """What a run reserves, or would: `app.agent_models.worst_case_cost` over the models it may call."""
        return worst_case_cost(self.primary, self.fallback,
                               lambda target: self.prompt_for(target, history, content).messages,
                               self.params.max_tokens)


def setup_of(session: Session, agent: Agent) -> AgentSetup:
    """From the agent's row and its models' rows, as a test run and the route test read them."""
    primary, fallback = agent_targets(session, agent)
    return AgentSetup(agent.system_prompt, AgentParams(agent.timeout_seconds, agent.temperature, agent.max_tokens),
                      primary, fallback)


def setup_columns(agents: FromClause, primary: FromClause, fallback: FromClause) -> list[ColumnElement[Any]]:
    """What a query reads of an agent, its primary and its (outer-joined) fallback for `setup_in_row`: a turn's
    claim reads them in its lock query, with the turn."""
    return [agents.c.system_prompt, agents.c.timeout_seconds, agents.c.temperature, agents.c.max_tokens,
            agents.c.fallback_model_id, *model_columns(primary, PRIMARY), *model_columns(fallback, FALLBACK)]


def setup_in_row(row: Any) -> AgentSetup:
    """From a row a query read with `setup_columns`."""
    primary = target_in_row(row, PRIMARY)
    assert primary is not None
    return AgentSetup(row.system_prompt, AgentParams(row.timeout_seconds, row.temperature, row.max_tokens),
                      primary, target_in_row(row, FALLBACK))
