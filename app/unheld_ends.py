"""Ending a run that no worker holds: a turn or test run whose message died (retries ran out), a turn stopped
while pending, and the runs the looks of the bounds that need no delivery find (`app.pending_bound`: waiting
too long; `app.deadline_bound`: past the deadline; `app.stop_bound`: stopped while its dead worker's lease
still held it).

A worker settles the runs it holds itself (`app.turn_runner`, `app.debug_runner`); these ends have no worker,
so they free what a turn held themselves, in two steps: the ending in the caller's transaction
(`end_unowned`), and after its commit the conversation's lock, the user's slot and the readers of the live
stream (`announce_unowned_end`). Before the commit they would let a new turn start, or a reader see `done`,
while the ending could still be rolled back. The looks find their runs by one query (`run_ids_where`), then end
each in a transaction of its own, judged again under the run's lock (`abandon`), so a worker that claimed the
run since the look, or another process ending it at once, changes nothing twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, Table, select
from sqlalchemy.orm import Session

from app import conversation_locks
from app.conversations import record_turn_end
from app.db import transaction
from app.debug_run_state import finish_debug_run
from app.failure_logs import log_failure
from app.in_flight import answer_in_flight
from app.interrupted_calls import record_calls_of_dead_deliveries
from app.live_stream import Streamed, stored_answer_attempt, text_streamed
from app.live_stream_writer import TurnStream
from app.models import ConversationMessage, DebugRun, Turn, table
from app.prepared import Prepared
from app.run_kinds import DEBUG_RUN, TURN, RunKind
from app.turn_state import end_turn_unowned
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UnownedEnd:
    held: conversation_locks.HeldTurn
    status: TurnStatus
    """The status the turn ended with: the one asked for, or `cancelled` where its user's stop came first."""
    kept: Streamed | None = None
    """The text its readers were sent, which the end keeps (`end_turn_unowned`)."""
    answer_attempt: int = 0
    """The attempt the stored answer is named by (`stored_answer_attempt`), which readers are moved to."""


def end_unowned(session: Session, turn_id: int, status: TurnStatus, reason: str, *,
                pending_before: datetime | None = None, deadline_before: datetime | None = None,
                streamed: Streamed | None = None) -> UnownedEnd | None:
    """In the caller's transaction; None when the turn was not ended here (it had ended, a live lease says a
    worker runs it, or, with `pending_before` or `deadline_before`, it is no longer pending since before then or
    processing past a deadline before then: `end_turn_unowned`). `streamed` is what a dead delivery sent the
    turn's readers, kept by the end."""
    ended = end_turn_unowned(session, turn_id, status, reason, pending_before=pending_before,
                             deadline_before=deadline_before, kept=streamed)
    if ended is None:
        return None
    turn, final = ended
    record_turn_end(session, turn.conversation_id, None)
    moved_to = stored_answer_attempt(session, turn_id) if streamed is not None else 0  # only readers of kept text move
    return UnownedEnd(conversation_locks.HeldTurn(turn_id, turn.user_id, turn.conversation_id), final, streamed,
                      moved_to)


def announce_unowned_end(ended: UnownedEnd) -> None:
    """After the commit. Readers holding the text the end kept are moved to it, sent no restart."""
    conversation_locks.release(ended.held)
    kept = ended.kept
    stream = TurnStream(ended.held.turn_id, readers_hold=kept, attempt=ended.answer_attempt)
    stream.finished(ended.status, kept.model if kept else None, kept.text if kept else None)


def abandon_turn(turn_id: int, reason: str, *, pending_before: datetime | None = None,
                 deadline_before: datetime | None = None,
                 unless: Callable[[Session], bool] | None = None) -> TurnStatus | None:
    """End a turn as `error` when its message died (retries exhausted), with `pending_before` when it was still
    pending since before then (`app.pending_bound`: the bound on waiting for a worker), with `deadline_before`
    when it was still processing, held by no worker, past a deadline before then (`app.deadline_bound`); as
    `cancelled` when its user had asked it to stop. Frees its reservation and slot, and records the calls its
    dead deliveries had streamed (`record_calls_of_dead_deliveries`: no delivery takes it over to do so). `unless`,
    asked first in the same transaction, can call the end off (`dead_letter_requeue.requeued`). Returns the status
    written, None when the turn was not ended here."""
    # Read before the transaction, which holds the turn's lock: a processing turn's readers may hold text of
    # its dead delivery's call (none for one pending).
    may_have_run = pending_before is None  # a dead message's turn, or one past its deadline
    streamed = text_streamed(turn_id) if may_have_run else None
    with transaction() as session:
        ended = None if unless is not None and unless(session) else end_unowned(
            session, turn_id, TurnStatus.ERROR, reason, pending_before=pending_before,
            deadline_before=deadline_before, streamed=streamed)
    if ended is None:
        return None
    if may_have_run:
        record_calls_of_dead_deliveries(turn_id)
    announce_unowned_end(ended)
    return ended.status


def abandon_debug_run(run_id: int, reason: str, *, pending_before: datetime | None = None,
                      deadline_before: datetime | None = None,
                      unless: Callable[[Session], bool] | None = None) -> TurnStatus | None:
    """End a test run as `error` when its message died, with `pending_before` when it was still pending since
    before then (`app.pending_bound`), with `deadline_before` when it was still processing, held by no worker,
    past a deadline before then (`app.deadline_bound`); None when it was not (ended already, held by a
    delivery, or no longer in that state), or when `unless`, asked first in the same transaction, says so. A
    test run has no stop, so the status written is always `error`: returned as `abandon_turn` returns its."""
    with transaction() as session:
        if unless is not None and unless(session):
            return None
        ended = finish_debug_run(session, run_id, None, TurnStatus.ERROR, pending_before=pending_before,
                                 deadline_before=deadline_before, error_message=reason)
    return TurnStatus.ERROR if ended else None


def turn_ids_where(turn: Callable[[Table, Table], ColumnElement[bool]], *columns: str) -> Prepared:
    """A look's query: the ids of the turns in flight for which `turn(turns, messages)` holds (a turn's status is
    on its answer's row), each with the turn's `columns` after it."""
    turns, messages = table(Turn), table(ConversationMessage)
    return Prepared(select(turns.c.assistant_message_id, *(turns.c[name] for name in columns))
                    .join_from(turns, messages, messages.c.id == turns.c.assistant_message_id)
                    .where(answer_in_flight(messages), turn(turns, messages)))


def run_ids_where(turn: Callable[[Table, Table], ColumnElement[bool]],
                  debug_run: Callable[[Table], ColumnElement[bool]]) -> dict[RunKind, Prepared]:
    """A look's query for each kind: `turn_ids_where(turn)`, and the ids of the test runs for which
    `debug_run(runs)` holds."""
    runs = table(DebugRun)
    return {TURN: turn_ids_where(turn), DEBUG_RUN: Prepared(select(runs.c.id).where(debug_run(runs)))}


def abandon(kind: RunKind, ident: int, reason: str, *, pending_before: datetime | None = None,
            deadline_before: datetime | None = None,
            unless: Callable[[Session], bool] | None = None) -> TurnStatus | None:
    """End a run of `kind` that no worker holds, as `error` with `reason` (`cancelled` for a turn whose user had
    asked it to stop): `abandon_turn`'s and `abandon_debug_run`'s terms. The status written, None when not ended; an
    end is logged with its status, which an operator reads to tell a stop from a failure."""
    end = abandon_turn if kind is TURN else abandon_debug_run
    status = end(ident, reason, pending_before=pending_before, deadline_before=deadline_before, unless=unless)
    if status is not None:
        log.warning("%s %s ended as %s: %s", kind.label, ident, status.value, reason)
    return status


def end_unheld(kind: RunKind, idents: Iterable[int], reason: str, found: str, *,
               pending_before: datetime | None = None, deadline_before: datetime | None = None,
               taking_lease: Callable[[Session, int], bool] | None = None) -> list[int]:
    """End each run of `kind` (`abandon`) if its lock finds it still as the look `found` it (pending since before
    `pending_before`, or processing past a deadline before `deadline_before`); the ids it ended. With
    `taking_lease`, each end first takes the run's lease from its holder in the same transaction, and is called off
    when that fails (the holder renewed it, or another delivery holds it now). One that cannot be ended now (the
    database away for a moment) is left to the next look, and the others are still ended."""
    ended = []
    for ident in idents:
        unless = None if taking_lease is None else _unless_taken(taking_lease, ident)
        try:
            if abandon(kind, ident, reason, pending_before=pending_before, deadline_before=deadline_before,
                       unless=unless):
                ended.append(ident)
        except Exception as error:
            log_failure(log, error, f"ending {kind.label} {ident}, {found}")
    return ended


def _unless_taken(taking_lease: Callable[[Session, int], bool], ident: int) -> Callable[[Session], bool]:
    """An end's `unless` (asked first in its transaction) that takes the run's lease, and calls the end off when
    it could not."""
    return lambda session: not taking_lease(session, ident)


__all__ = ["UnownedEnd", "abandon", "abandon_debug_run", "abandon_turn", "announce_unowned_end", "end_unheld",
           "end_unowned", "run_ids_where", "turn_ids_where"]
