"""The admin test run's state machine: its claim, its end, an operator's requeue.

A test run's status lives on its single log row (`admin_debug_logs`), with the same statuses,
transition table, lease and delivery rules as a turn's (`app.turn_state`, `app.deliveries`), but no
second message, no reservation and no charge.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.claims import Claim, ClaimResult, LeaseLost, judge_claim, lease_held
from app.clock import DatabaseNow, lease_time
from app.db import rows_changed
from app.deliveries import deliveries_at_requeue
from app.in_flight import pending_since_before, processing_past
from app.models import Agent, DebugRun
from app.models.base import utc_now
from app.turn_status import TransitionRefused, TurnStatus, sources_for


def claim_debug_run(session: Session, run_id: int, lease_seconds: float) -> ClaimResult:
    """The same claim for an admin test run, whose status lives on its single log row: a pending run
    moves to `processing` as the transition table allows, a taken-over one keeps its status and gets a new
    lease. Each counts a delivery: the claim's `deliveries` is the row's new count."""
    locked = session.execute(  # the agent's whole row: its runner reads it next, from the session
        select(DebugRun, Agent, DatabaseNow())
        .join(Agent, Agent.id == DebugRun.agent_id).where(DebugRun.id == run_id).with_for_update(of=DebugRun)
    ).first()
    if locked is None:
        return ClaimResult(Claim.MISSING)
    run, agent, now = locked
    decision = judge_claim(run.status, run.lease_token, run.lease_expires_at, run.deadline_at, now,
                           timeout_seconds=agent.timeout_seconds, has_fallback=agent.fallback_model_id is not None,
                           lease_seconds=lease_seconds)
    outcome, deadline = decision.outcome, decision.deadline
    if deadline is None:
        return ClaimResult(outcome)
    if outcome is Claim.TAKEN_OVER:
        take = update(DebugRun).where(DebugRun.id == run_id, DebugRun.status == TurnStatus.PROCESSING.value)
    else:
        take = (update(DebugRun).where(DebugRun.id == run_id,
                                       DebugRun.status.in_(sources_for(TurnStatus.PROCESSING)))
                .values(status=TurnStatus.PROCESSING.value))
    taken = session.execute(
        take.values(lease_token=decision.token, lease_expires_at=decision.lease_expires_at, deadline_at=deadline.at,
                    deliveries=DebugRun.deliveries + 1, updated_at=utc_now())
        .returning(DebugRun.deliveries, DebugRun.handed_back)
        .execution_options(synchronize_session=False)
    ).first()
    if taken is None:
        raise TransitionRefused(f"test run {run_id} cannot move to processing")
    return ClaimResult(outcome, None, decision.token, taken.deliveries, handed_back=taken.handed_back,
                       time_left=deadline.time_left)


def finish_debug_run(session: Session, run_id: int, token: str | None, target: TurnStatus,
                     at: datetime | None = None, *, pending_before: datetime | None = None,
                     deadline_before: datetime | None = None, **result: Any) -> bool:
    """Guarded like a turn's end: by the statuses it may leave and, for a worker, by its lease; without a
    token (its message died, or it waited too long) only a run under no live lease is ended, as
    `end_turn_unowned` does, and with `pending_before` only one still pending since before then, with
    `deadline_before` only one still processing past a deadline before then, judged on the locked row. Stamped
    `at` as `finish_turn` stamps a turn."""
    query = update(DebugRun).where(DebugRun.id == run_id, DebugRun.status.in_(sources_for(target)))
    if token is not None:
        query = query.where(DebugRun.lease_token == token)
    elif _held_by_a_delivery(session, run_id):
        return False
    if pending_before is not None:
        query = query.where(pending_since_before(DebugRun.status, DebugRun.updated_at, pending_before))
    if deadline_before is not None:
        query = query.where(processing_past(DebugRun.status, DebugRun.deadline_at, deadline_before))
    moved = rows_changed(session, query.values(status=target.value, lease_token=None, lease_expires_at=None,
                                               updated_at=at or utc_now(), **result)
                         .execution_options(synchronize_session=False))
    if moved != 1 and token is not None:
        raise LeaseLost(f"test run {run_id} is owned by another worker or already ended")
    return moved == 1


def _held_by_a_delivery(session: Session, run_id: int) -> bool:
    """The run's row, locked until the caller's end is written, is under a live lease (`lease_held`)."""
    row = session.execute(select(DebugRun.lease_token, DebugRun.lease_expires_at, DatabaseNow())
                          .where(DebugRun.id == run_id).with_for_update()).first()
    return row is not None and lease_held(row[0], row[1], lease_time(row[2]))


def reopen_debug_run(session: Session, run_id: int, enqueued_at: datetime) -> int:
    """The same requeue for an admin test run that ended as `error`, its deliveries numbered on from the next
    thousand as a turn's are (`deliveries_at_requeue`), so that the attempts it records never share a number
    with those of its earlier life. Returns the run's agent, which the caller checks next."""
    reopened = session.execute(
        update(DebugRun)
        .where(DebugRun.id == run_id, DebugRun.status.in_(sources_for(TurnStatus.PENDING)))
        .values(status=TurnStatus.PENDING.value, error_message=None, lease_token=None, lease_expires_at=None,
                deliveries=deliveries_at_requeue(DebugRun.deliveries), handed_back=0, fell_back=False,
                enqueued_at=enqueued_at, updated_at=utc_now())
        .returning(DebugRun.agent_id)
        .execution_options(synchronize_session=False)
    ).first()  # the row, not the rowcount: SQLite counts none for an UPDATE ... RETURNING
    if reopened is None:
        raise TransitionRefused(f"test run {run_id} cannot move to pending")
    return int(reopened.agent_id)

