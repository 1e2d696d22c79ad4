"""Admin debugging: what a turn of an agent would do, a real test run of it, and what test runs cost.

The route test and the prompt preview answer from the same pieces the worker uses (`moderate`,
`successful_history`, and the agent as a run calls it, `app.agent_setup.AgentSetup`: its models, its
prompt, its worst case) and call no model, so they cost nothing and leave no record. An execution test
is a row of `admin_debug_logs` run by the workers (`app.debug_runner`) with the agent's timeout and
fallback; it is priced at the model's prices and never touches a balance or the ledger. The cost
analysis sums those rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.selectable import ScalarSelect

from app import outbox
from app.agent_setup import AgentSetup, setup_of
from app.auth import Principal
from app.catalog import live_agent
from app.db import transaction
from app.errors import NotFound, ValidationFailed
from app.models import Conversation, DebugRun, LlmModel
from app.models.base import money_total, money_total_parts, utc_now
from app.moderation import Verdict, moderate
from app.paging import PAGE_OF_A_WHOLE_LIST, every_row, page_of
from app.prompt import ChatMessage, Prompt, successful_history
from app.run_kinds import DEBUG_RUN
from app.turn_intake import check_content
from app.turn_status import TurnStatus

GroupBy = Literal["agent", "model", "admin"]
_RUN_COLUMN_OF = {"agent": DebugRun.agent_id, "admin": DebugRun.admin_id}


@dataclass(frozen=True, slots=True)
class RouteDecision:
    model: str
    fallback_model: str | None
    timeout_seconds: float
    moderation: Verdict
    estimated_prompt_tokens: int
    estimated_cost: Decimal


class DebugLogPage(NamedTuple):
    items: list[DebugRun]
    next_before_id: int | None


@dataclass(frozen=True, slots=True)
class CostLine:
    key: int
    runs: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal


def _agent_setup(session: Session, agent_id: int, shared_lock: bool = False) -> AgentSetup:
    """The agent as its next run would call it; a deleted agent is not found (it takes no new work)."""
    return setup_of(session, live_agent(session, agent_id, shared_lock))


def route_decision(agent_id: int, content: str, conversation_id: int | None = None) -> RouteDecision:
    """What a new turn of the agent would get now; the estimated cost is the worst case a turn reserves, with
    the history of `conversation_id` when given: what its next turn would hold of its user's balance, the
    figure an `insufficient_balance` refusal weighed."""
    with transaction() as session:
        setup = _agent_setup(session, agent_id)
        history = _history_of(session, agent_id, conversation_id)
    check_content(content)
    prompt = setup.prompt_for(setup.primary, history, content)
    return RouteDecision(
        model=setup.primary.name,
        fallback_model=setup.fallback.name if setup.fallback is not None else None,
        timeout_seconds=setup.params.timeout_seconds,
        moderation=moderate(content),
        estimated_prompt_tokens=prompt.estimated_tokens,
        estimated_cost=setup.worst_case_cost(history, content),
    )


def preview_prompt(agent_id: int, content: str, conversation_id: int | None = None) -> Prompt:
    """The messages the primary model would receive, with the history of `conversation_id` when given."""
    with transaction() as session:
        setup = _agent_setup(session, agent_id)
        history = _history_of(session, agent_id, conversation_id)
    check_content(content)
    return setup.prompt_for(setup.primary, history, content)


def _history_of(session: Session, agent_id: int, conversation_id: int | None) -> list[ChatMessage]:
    """The history a turn of the conversation would carry; any user's conversation of this agent may supply it
    (another agent's would never be sent to this one)."""
    if conversation_id is None:
        return []
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.deleted_at is not None:
        raise NotFound("No such conversation.")
    if conversation.agent_id != agent_id:
        raise ValidationFailed(f"Conversation {conversation_id} belongs to agent {conversation.agent_id}: no turn "
                               "of this agent would be sent its history.", code="conversation_of_another_agent")
    return successful_history(session, conversation_id)


def start_debug_run(admin: Principal, agent_id: int, content: str) -> int:
    """Record the test run, then send it to the workers; a failed send is left to recovery."""
    with transaction() as session:
        _agent_setup(session, agent_id, shared_lock=True)
        check_content(content)
        enqueued_at = utc_now()
        run = DebugRun(agent_id=agent_id, admin_id=admin.id, input=content, enqueued_at=enqueued_at)
        session.add(run)
        session.flush()
        run_id = run.id
    outbox.send(DEBUG_RUN, run_id, enqueued_at)
    return run_id


def get_debug_log(log_id: int) -> DebugRun:
    with transaction() as session:
        run = session.get(DebugRun, log_id)
        if run is None:
            raise NotFound("No such debug log.")
        return run


class WaitedTestRun(NamedTuple):
    run: DebugRun
    still_running: str | None
    """Why the run has not ended after the wait, for whoever waited; None once it has."""

    @property
    def unsuccessful(self) -> str | None:
        """How the run ended, when it ended in anything but `success`: a smoke test that waits on an agent must
        tell a model that is down from one that answered without reading the printed run."""
        if self.still_running is not None or self.run.status == TurnStatus.SUCCESS:
            return None
        return f"test run {self.run.id} ended {self.run.status}" + (
            f": {self.run.error_message}" if self.run.error_message else "")


def wait_for_debug_log(log_id: int, timeout: float, poll_seconds: float = 0.2) -> WaitedTestRun:
    """The test run once it has ended, or as it is when `timeout` seconds have passed: for a shell that waits
    where the API's client would poll."""
    deadline = time.monotonic() + timeout
    run = get_debug_log(log_id)
    while not TurnStatus(run.status).is_terminal and time.monotonic() < deadline:
        time.sleep(poll_seconds)
        run = get_debug_log(log_id)
    if TurnStatus(run.status).is_terminal:
        return WaitedTestRun(run, None)
    hint = " (is a worker serving the `debug` queue running?)" if run.status == TurnStatus.PENDING else ""
    return WaitedTestRun(run, f"test run {log_id} is still {run.status} after {timeout:g}s{hint}")


def list_debug_logs(agent_id: int | None = None, limit: int = 50, before_id: int | None = None) -> DebugLogPage:
    """Newest first; ids only grow, so `before_id` pages stably while new runs arrive."""
    query = select(DebugRun).order_by(DebugRun.id.desc()).limit(limit + 1)
    if agent_id is not None:
        query = query.where(DebugRun.agent_id == agent_id)
    if before_id is not None:
        query = query.where(DebugRun.id < before_id)
    with transaction() as session:
        rows = list(session.scalars(query))
    return DebugLogPage(*page_of(rows, limit, lambda row: row.id))


def every_debug_log(agent_id: int | None = None, before_id: int | None = None) -> Iterator[DebugRun]:
    """Every log (of one agent), newest first, read a page at a time so that a long history is never held
    whole: the contract's unpaged list is streamed from it."""
    return every_row(lambda cursor: list_debug_logs(agent_id, PAGE_OF_A_WHOLE_LIST, cursor), before_id)


def _model_id_of_run() -> ScalarSelect[int]:
    """For a log written before `model_id` was kept: the live model of its model's name wins, else the
    newest one (names recur after deletes)."""
    return (
        select(LlmModel.id)
        .where(LlmModel.name == DebugRun.model)
        .order_by(LlmModel.deleted_at.is_(None).desc(), LlmModel.id.desc())
        .limit(1)
        .correlate(DebugRun)
        .scalar_subquery()
    )


def debug_costs(group_by: GroupBy) -> list[CostLine]:
    """Runs, tokens and cost per agent, model or admin; runs no model answered have no model to count under."""
    key = func.coalesce(DebugRun.model_id, _model_id_of_run()) if group_by == "model" else _RUN_COLUMN_OF[group_by]
    runs = select(key.label("key"), DebugRun.prompt_tokens, DebugRun.completion_tokens, DebugRun.cost).subquery()
    with transaction() as session:
        cost = money_total_parts(runs.c.cost, session.get_bind().dialect)
        query = (
            select(runs.c.key, func.count(), func.coalesce(func.sum(runs.c.prompt_tokens), 0),
                   func.coalesce(func.sum(runs.c.completion_tokens), 0), *cost)
            .where(runs.c.key.is_not(None))
            .group_by(runs.c.key)
            .order_by(runs.c.key)
        )
        return [CostLine(int(k), int(n), int(p), int(c), money_total(costs))
                for k, n, p, c, *costs in session.execute(query)]


__all__ = ["CostLine", "DebugLogPage", "RouteDecision", "WaitedTestRun", "debug_costs",
           "every_debug_log", "get_debug_log", "list_debug_logs", "preview_prompt", "route_decision",
           "start_debug_run", "wait_for_debug_log"]
