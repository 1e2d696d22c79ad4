"""The bound on a stop that no delivery carries out: a turn its user stopped while its worker's lease still
held it (the worker had just died, or was about to), whose lease then ran out with no worker left to take the
turn over and end it.

A stop ends at once a turn that no delivery holds when the stop comes (`app.cancellation`); one still held is
flagged for its worker, and a dead worker's turn is ended by the delivery that takes it over. With no worker
running, nothing took it over: the turn stayed `processing` and its conversation busy until the deadline bound
(`app.deadline_bound`), its timeouts, grace and a lease after its first delivery, an hour for an agent with a
3,600 s timeout. So while no worker process takes runs, each API process's loop (`app.unheld_run_bounds`)
ends, `cancelled`, each stopped turn whose lease ran out a lease ago or more, as the stop itself would have,
keeping the text the dead worker streamed, unpaid; each end judged again under the turn's lock
(`app.unheld_ends.abandon`), so a delivery that took the turn over since the look is left to end it.

Sooner, whether or not a worker runs: a stopped turn whose worker has left the workers' list and gone silent
(`app.silent_holders`) is ended the same way by that loop, and by the stop's own answer before it waits for the
worker (`end_stops_of_gone_holders`), 20 s after the dead worker's last renewal with the default lease.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from functools import cache

import redis
from sqlalchemy import ColumnElement, DateTime, Table, and_, bindparam
from sqlalchemy.orm import Session

from app.claims import lease_over
from app.clock import lease_now
from app.config import get_settings
from app.db import transaction
from app.prepared import Prepared
from app.run_kinds import TURN
from app.silent_holders import renewed_by, runs_of_gone_holders, silent_lease, take_silent_lease
from app.turn_status import STOPPED, TurnStatus
from app.unheld_ends import end_unheld, turn_ids_where
from app.worker_presence import WorkerState, live_workers

log = logging.getLogger(__name__)


def _stopped(turns: Table, messages: Table) -> ColumnElement[bool]:
    """A turn `processing` whose user asked it to stop."""
    return and_(messages.c.status == TurnStatus.PROCESSING.value, turns.c.cancel_requested_at.is_not(None))


def _stopped_unheld(turns: Table, messages: Table) -> ColumnElement[bool]:
    """A stopped turn whose lease ran out before the `expired_before` parameter: by the recovery sweep's rule
    (`lease_over`), so a turn a failed delivery handed to its retry, or one a stopping worker is sending on, is
    left to the delivery that takes it, until that window too is over."""
    expired_before = bindparam("expired_before", type_=DateTime(timezone=True))
    return and_(_stopped(turns, messages), lease_over(turns.c.lease_expires_at, expired_before))


@cache
def _stopped_turns() -> Prepared:
    return turn_ids_where(_stopped_unheld)  # an admin's test run takes no stop


def _a_worker_takes_runs() -> bool:
    """Whether a live worker process takes new runs (`app.worker_presence`): its recovery sweep then sends a
    stopped turn whose lease ran out again, and the delivery that takes it over ends it, as a takeover does
    (the look would race it, and win when that worker is slow to boot). With Redis out of reach it is not known,
    and taken as none."""
    try:
        return any(presence.state is WorkerState.TAKING_RUNS for presence in live_workers())
    except redis.RedisError:
        return False


def end_stops_no_delivery_carries_out(now: datetime) -> list[int]:
    """An API process's look, at the database's `now` (read once its `TakeoverGate` opened: a worker whose
    renewals an outage held up renews first, and ends its stopped turn itself, paid for the tokens it
    generated): the stopped turns no delivery holds, ended `cancelled`, while no worker process takes runs. A
    lease that ran out counts a lease later, the time the recovery sweep gives the message it sends then."""
    expired_before = now - timedelta(seconds=get_settings().lease_seconds)
    with transaction() as session:
        found = list(_stopped_turns()(session, {"expired_before": expired_before}).scalars())
    if not found or _a_worker_takes_runs():  # the workers' presence is read only when there is a turn to end
        return []
    return end_stopped_turns(found)


@cache
def _stopped_silent_turns(one: bool) -> Prepared:
    """The stopped turns under a lease still held (past `now`) but unrenewed for a while (expiring before
    `renewed_by`: `app.silent_holders`), with their tokens; with `one`, only the turn `only` (a stop's own look).
    A lease that ran out is the other look's, and the recovery sweep's."""
    now = bindparam("now", type_=DateTime(timezone=True))

    def stopped_silent(turns: Table, messages: Table) -> ColumnElement[bool]:
        silent = and_(_stopped(turns, messages), silent_lease(turns.c.lease_token, turns.c.lease_expires_at, now))
        return and_(silent, turns.c.assistant_message_id == bindparam("only")) if one else silent

    return turn_ids_where(stopped_silent, "lease_token")


def end_stops_of_gone_holders(only: int | None = None) -> list[int]:
    """End, `cancelled`, each stopped turn whose worker has gone silent and left the workers' list (both signs, as
    the recovery sweep reads them: `app.silent_holders`), at once rather than when another worker takes it over
    (with none running, a lease after its lease ran out); `only` restricts the look to one turn (a stop's own
    answer). Each end first runs the lease out in its transaction, if still unrenewed (`RunKind.end_lease_now`):
    a holder that renewed since the look keeps its turn, and ends it itself. The ids it ended."""
    with transaction() as session:
        now = lease_now(session)
        asked = {"now": now, "renewed_by": renewed_by(now), **({} if only is None else {"only": only})}
        silent = _stopped_silent_turns(only is not None)(session, asked).rows
    gone = runs_of_gone_holders(silent)
    tokens = {row.assistant_message_id: row.lease_token for row in silent if row.assistant_message_id in gone}

    def taking_lease(unit: Session, turn_id: int) -> bool:
        return take_silent_lease(unit, TURN, turn_id, tokens[turn_id], now)

    ended = end_unheld(TURN, tokens, STOPPED, "stopped, its worker gone from the workers' list",
                       taking_lease=taking_lease)
    for turn_id in ended:
        log.warning("turn %s was stopped while the worker holding it had left the workers' list and gone silent: "
                    "ended cancelled with the text it had streamed, unpaid", turn_id)
    return ended


def end_stopped_turns(turn_ids: list[int]) -> list[int]:
    """End, `cancelled`, each stopped turn no delivery holds (judged again under its lock): this look's, and one
    that no delivery held when the stop came (`app.cancellation`). The ids it ended."""
    return end_unheld(TURN, turn_ids, STOPPED, "stopped with no delivery holding it")


__all__ = ["end_stopped_turns", "end_stops_no_delivery_carries_out", "end_stops_of_gone_holders"]
