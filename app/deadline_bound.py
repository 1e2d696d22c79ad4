"""The bound on a run past its deadline that no worker holds: ended as `error` by whichever process looks first.

A run's deadline (each model's timeout and the grace, counted from its first delivery: `app.deliveries`) is
kept by every delivery. When the worker holding the run dies, or is stuck past the deadline, the recovery sweep
sends the run again (revoking a stuck worker's lease first), and that delivery ends it as `error`. That delivery
can come late, or never: behind a backlog the message waits its turn in the queue, sent again at every lease,
and with no worker running at all nothing takes it, while the turn holds its conversation (409) and one of its
user's slots. So a run still `processing`, under no live lease, `AGENTQ_LEASE_SECONDS` after its deadline (the
time the sweep gives a message it sent before it sends another: a delivery of the message sent at the deadline,
which ends the run as `error` and dead-letters its message, comes first when a worker is free) is ended here, as the
pending bound ends a run that waits too long (`app.pending_bound`): by the recovery sweep of every worker
process and by the loop of every API process, each end judged again under the run's lock, so a delivery that
claimed the run meanwhile is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import ColumnElement, DateTime, and_, bindparam

from app.claims import lease_not_held
from app.config import get_settings
from app.db import transaction
from app.in_flight import processing_past
from app.prepared import Prepared
from app.run_kinds import RunKind
from app.unheld_ends import end_unheld, run_ids_where


def past_deadline_reason(kind: RunKind) -> str:
    return (f"gave up: the {kind.label} was still running {get_settings().lease_seconds:g} s after its "
            "deadline (each model's timeout and the grace, counted from its first delivery), and no worker held it")


def deadline_cutoff(now: datetime) -> datetime:
    """A run whose deadline came before this moment (the database's `now`) is past it by the bound's margin."""
    return now - timedelta(seconds=get_settings().lease_seconds)


def unheld_past_deadline(status: ColumnElement[str], lease_token: ColumnElement[str | None],
                         lease_expires_at: ColumnElement[datetime | None],
                         deadline_at: ColumnElement[datetime | None]) -> ColumnElement[bool]:
    """A run `processing` past the `deadline_before` parameter (`deadline_cutoff`) whose lease no delivery holds
    at the `now` parameter (revoked, handed to a retry, or run out), given the columns of its status and lease."""
    now = bindparam("now", type_=DateTime(timezone=True))
    return and_(processing_past(status, deadline_at, bindparam("deadline_before", type_=DateTime(timezone=True))),
                lease_not_held(lease_token, lease_expires_at, now))


def end_past_deadline(kind: RunKind, idents: Iterable[int], deadline_before: datetime) -> list[int]:
    """End each run of `kind` still processing past `deadline_before` once locked, under no live lease; the ids
    it ended."""
    return end_unheld(kind, idents, past_deadline_reason(kind), "past its deadline", deadline_before=deadline_before)


@cache
def _past_deadline() -> dict[RunKind, Prepared]:
    return run_ids_where(
        lambda turns, messages: unheld_past_deadline(messages.c.status, turns.c.lease_token, turns.c.lease_expires_at,
                                                     turns.c.deadline_at),
        lambda runs: unheld_past_deadline(runs.c.status, runs.c.lease_token, runs.c.lease_expires_at,
                                          runs.c.deadline_at))


def end_runs_past_deadline(now: datetime) -> dict[RunKind, list[int]]:
    """An API process's look, at the database's `now` (read once its `TakeoverGate` opened): the runs of each
    kind past their deadline under no lease, ended."""
    cutoffs = {"now": now, "deadline_before": deadline_cutoff(now)}
    with transaction() as session:
        found = {kind: list(query(session, cutoffs).scalars()) for kind, query in _past_deadline().items()}
    return {kind: end_past_deadline(kind, idents, cutoffs["deadline_before"]) for kind, idents in found.items()}


__all__ = ["deadline_cutoff", "end_past_deadline", "end_runs_past_deadline", "past_deadline_reason",
           "unheld_past_deadline"]
