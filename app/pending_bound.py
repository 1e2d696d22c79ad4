"""The bound on waiting for a worker: a turn still `pending` `AGENTQ_MAX_PENDING_SECONDS` after its acceptance
(or requeue) is ended as `error`, uncharged, its conversation freed (guarantee 1); an admin test run is ended
as `error` the same way.

Whichever process of the deployment looks first ends it: the recovery sweep of every worker process
(`app.recovery`), and a loop of its own in every API process (`app.unheld_run_bounds`), so the bound holds
with no worker running at all (every worker gone, or none serving the run's queue), not only behind a
backlog. A worker that gets the run's message later finds it ended and does nothing. Each end is judged
again under the run's lock (`app.unheld_ends.abandon`), so two
processes looking at once, or a worker claiming the run between the look and the end, change nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import ColumnElement, DateTime, bindparam

from app.clock import lease_now
from app.config import get_settings
from app.db import transaction
from app.in_flight import pending_since_before
from app.prepared import Prepared
from app.run_kinds import RunKind
from app.unheld_ends import end_unheld, run_ids_where


def waited_too_long_reason(kind: RunKind) -> str:
    """Why a run that stayed `pending` too long is ended: behind a backlog, or with no worker serving its
    queue. Guarantee 1 bounds how long a turn stays pending, and an answer that starts that late has lost
    its reader; an admin's test run is held to the same bound, so that it too ends, with the reason."""
    return (f"no worker started the {kind.label} within {get_settings().max_pending_seconds:g} s of its acceptance "
            "(AGENTQ_MAX_PENDING_SECONDS)")


def pending_cutoff(now: datetime) -> datetime:
    """A run pending since before this moment (the database's `now`) has waited too long."""
    return now - timedelta(seconds=get_settings().max_pending_seconds)


def waited_too_long(status: ColumnElement[str], updated_at: ColumnElement[datetime]) -> ColumnElement[bool]:
    """A run pending since before the `pending_before` parameter (`pending_cutoff`), given its status column
    and the `updated_at` of the row that holds it, which moves with that status and not with the outbox marks
    of re-sends (`RunKind.claim_outbox_mark`)."""
    return pending_since_before(status, updated_at, bindparam("pending_before", type_=DateTime(timezone=True)))


def end_pending_too_long(kind: RunKind, idents: Iterable[int], pending_before: datetime) -> list[int]:
    """End each run of `kind` still pending since before `pending_before` once locked; the ids it ended."""
    return end_unheld(kind, idents, waited_too_long_reason(kind), "pending too long", pending_before=pending_before)


@cache
def _pending_too_long() -> dict[RunKind, Prepared]:
    return run_ids_where(lambda _turns, messages: waited_too_long(messages.c.status, messages.c.updated_at),
                     lambda runs: waited_too_long(runs.c.status, runs.c.updated_at))


def end_runs_pending_too_long() -> dict[RunKind, list[int]]:
    """An API process's look: the runs of each kind pending too long by the database's clock, ended."""
    with transaction() as session:
        pending_before = pending_cutoff(lease_now(session))
        found = {kind: list(query(session, {"pending_before": pending_before}).scalars())
                 for kind, query in _pending_too_long().items()}
    return {kind: end_pending_too_long(kind, idents, pending_before) for kind, idents in found.items()}


__all__ = ["end_pending_too_long", "end_runs_pending_too_long", "pending_cutoff", "waited_too_long",
           "waited_too_long_reason"]
