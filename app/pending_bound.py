"""The bound on waiting for a worker: a turn still `pending` `AGENTQ_MAX_PENDING_SECONDS` after its acceptance
(or requeue) is ended as `error`, uncharged, its conversation freed (guarantee 1).

Whichever process of the deployment looks first ends it: the recovery sweep of every worker process
(`app.recovery`), and a loop of its own in every API process (`PendingBoundLoop`), so the bound holds
with no worker running at all (every worker gone, or none serving the turns' queue), not only behind a
backlog. A worker that gets the turn's message later finds it ended and does nothing. Each end is judged
again under the turn's lock (`app.turn_runner.abandon_turn`), so two processes looking at once, or a
worker claiming the turn between the look and the end, change nothing twice.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta
from functools import cache

from sqlalchemy import DateTime, bindparam, select

from app.clock import lease_now
from app.config import get_settings
from app.db import transaction
from app.deliveries import waited_too_long_reason
from app.in_flight import answer_in_flight, pending_since_before
from app.models import ConversationMessage, Turn, table
from app.outages import log_failure
from app.prepared import Prepared
from app.turn_runner import abandon_turn

log = logging.getLogger(__name__)


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
        .where(answer_in_flight(messages),
               pending_since_before(messages.c.status, messages.c.updated_at,
                                    bindparam("pending_before", type_=DateTime(timezone=True)))))


def end_turns_pending_too_long() -> list[int]:
    """An API process's look: the turns pending too long by the database's clock, ended."""
    with transaction() as session:
        pending_before = lease_now(session) - timedelta(seconds=get_settings().max_pending_seconds)
        turn_ids = list(_pending_too_long()(session, {"pending_before": pending_before}).scalars())
    return end_pending_too_long(turn_ids, pending_before)


class PendingBoundLoop:
    """`end_turns_pending_too_long` every `AGENTQ_RECOVERY_INTERVAL_SECONDS` (with jitter, so processes do not
    look in step), in a daemon thread of an API process. Its query reads the partial index of answers in
    flight, so a look costs one short statement however many turns the deployment has run."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="pending-bound", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = get_settings().recovery_interval_seconds
        while not self._stop.wait(interval * random.uniform(0.5, 1.0)):
            try:
                end_turns_pending_too_long()
            except Exception as error:
                log_failure(log, error, "looking for turns pending too long")


__all__ = ["PendingBoundLoop", "end_pending_too_long", "end_turns_pending_too_long"]
