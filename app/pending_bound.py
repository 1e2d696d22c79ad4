"""The bound on waiting for a worker: a turn still `pending` `AGENTQ_MAX_PENDING_SECONDS` after its acceptance
(or requeue) is ended as `error`, uncharged, its conversation freed (guarantee 1).

Whichever process of the deployment looks first ends it: the recovery sweep of every worker process
(`app.recovery`), and a loop of its own in every API process (`start_pending_bound`), so the bound holds
with no worker running at all (every worker gone, or none serving the turns' queue), not only behind a
backlog. A worker that gets the turn's message later finds it ended and does nothing. Each end is judged
again under the turn's lock (`app.turn_runner.abandon_turn`), so two processes looking at once, or a
worker claiming the turn between the look and the end, change nothing twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import ColumnElement, DateTime, Table, bindparam, select

from app.clock import lease_now
from app.config import get_settings
from app.db import transaction
from app.in_flight import answer_in_flight, pending_since_before
from app.models import ConversationMessage, Turn, table
from app.outages import log_failure
from app.prepared import Prepared
from app.turn_runner import abandon_turn

log = logging.getLogger(__name__)


def waited_too_long_reason() -> str:
    """Why a turn that stayed `pending` too long is ended: behind a backlog, or with no worker serving its
    queue. Guarantee 1 bounds how long a turn stays pending, and an answer that starts that late has lost
    its reader."""
    return (f"no worker started the turn within {get_settings().max_pending_seconds:g} s of its acceptance "
            "(AGENTQ_MAX_PENDING_SECONDS)")


def pending_cutoff(now: datetime) -> datetime:
    """A turn pending since before this moment (the database's `now`) has waited too long."""
    return now - timedelta(seconds=get_settings().max_pending_seconds)


def waited_too_long(messages: Table) -> ColumnElement[bool]:
    """An answer pending since before the `pending_before` parameter (`pending_cutoff`): its status is the
    turn's, and its `updated_at` moves only with that status (not with the outbox marks of re-sends)."""
    return pending_since_before(messages.c.status, messages.c.updated_at,
                                bindparam("pending_before", type_=DateTime(timezone=True)))


def end_pending_too_long(turn_ids: Iterable[int], pending_before: datetime) -> list[int]:
    """End each turn still pending since before `pending_before` once locked; the ids it ended. One that cannot
    be ended now (the database away for a moment) is left to the next look, and the others are still ended."""
    reason = waited_too_long_reason()
    ended = []
    for turn_id in turn_ids:
        try:
            if abandon_turn(turn_id, reason, pending_before=pending_before):
                ended.append(turn_id)
                log.warning("turn %s ended as error: %s", turn_id, reason)
        except Exception as error:
            log_failure(log, error, f"ending turn {turn_id}, pending too long")
    return ended


@cache
def _pending_too_long() -> Prepared:
    turns, messages = table(Turn), table(ConversationMessage)
    return Prepared(
        select(turns.c.assistant_message_id)
        .join_from(turns, messages, messages.c.id == turns.c.assistant_message_id)
        .where(answer_in_flight(messages), waited_too_long(messages)))


def end_turns_pending_too_long() -> list[int]:
    """An API process's look: the turns pending too long by the database's clock, ended."""
    with transaction() as session:
        pending_before = pending_cutoff(lease_now(session))
        turn_ids = list(_pending_too_long()(session, {"pending_before": pending_before}).scalars())
    return end_pending_too_long(turn_ids, pending_before)


def start_pending_bound() -> None:
    """`end_turns_pending_too_long` every `AGENTQ_RECOVERY_INTERVAL_SECONDS` (with jitter, so processes do not
    look in step), in a daemon thread of an API process, for the process's life. Its query reads the partial
    index of answers in flight, so a look costs one short statement however many turns the deployment has run."""
    threading.Thread(target=_look_every_interval, name="pending-bound", daemon=True).start()


def _look_every_interval() -> None:
    interval = get_settings().recovery_interval_seconds
    while True:
        time.sleep(interval * random.uniform(0.5, 1.0))
        try:
            end_turns_pending_too_long()
        except Exception as error:
            log_failure(log, error, "looking for turns pending too long")


__all__ = ["end_pending_too_long", "end_turns_pending_too_long", "pending_cutoff", "start_pending_bound",
           "waited_too_long", "waited_too_long_reason"]
