"""Ending a turn that no worker holds: its message died (retries ran out), or it was stopped while pending.

A worker settles the turns it runs itself (`app.turn_runner`); these two ends have no worker, so
they free what the turn held themselves, in the same two steps: the ending in the caller's
transaction (`end_unowned`), and after its commit the conversation's lock, the user's slot and the
readers of the live stream (`announce_unowned_end`). Before the commit they would let a new turn
start, or a reader see `done`, while the ending could still be rolled back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from app import coordination
from app.conversations import record_turn_end
from app.db import transaction
from app.live_stream import Streamed, TurnStream, text_streamed
from app.turn_state import end_turn_unowned
from app.turn_status import TurnStatus


@dataclass(frozen=True, slots=True)
class UnownedEnd:
    held: coordination.HeldTurn
    status: TurnStatus
    """The status the turn ended with: the one asked for, or `cancelled` where its user's stop came first."""
    kept: Streamed | None = None
    """The text its readers were sent, which a `cancelled` end keeps (`end_turn_unowned`)."""


def end_unowned(session: Session, turn_id: int, status: TurnStatus, reason: str, *,
                pending_before: datetime | None = None, deadline_before: datetime | None = None,
                streamed: Streamed | None = None) -> UnownedEnd | None:
    """In the caller's transaction; None when the turn was not ended here (it had ended, a live lease says a
    worker runs it, or, with `pending_before` or `deadline_before`, it is no longer pending since before then or
    processing past a deadline before then: `end_turn_unowned`). `streamed` is what a dead delivery sent the
    turn's readers, kept if the end is a stop's."""
    ended = end_turn_unowned(session, turn_id, status, reason, pending_before=pending_before,
                             deadline_before=deadline_before, kept=streamed)
    if ended is None:
        return None
    turn, final = ended
    record_turn_end(session, turn.conversation_id, None)
    return UnownedEnd(coordination.HeldTurn(turn_id, turn.user_id, turn.conversation_id), final,
                      streamed if final is TurnStatus.CANCELLED else None)


def announce_unowned_end(ended: UnownedEnd) -> None:
    """After the commit. Readers holding the text the end kept are moved to it, sent no restart."""
    coordination.release(ended.held)
    kept = ended.kept
    TurnStream(ended.held.turn_id, readers_hold=kept).finished(ended.status, kept.model if kept else None,
                                                               kept.text if kept else None)


def abandon_turn(turn_id: int, reason: str, *, pending_before: datetime | None = None,
                 deadline_before: datetime | None = None,
                 unless: Callable[[Session], bool] | None = None) -> TurnStatus | None:
    """End a turn as `error` when its message died (retries exhausted), with `pending_before` when it was still
    pending since before then (`app.pending_bound`: the bound on waiting for a worker), with `deadline_before`
    when it was still processing, held by no worker, past a deadline before then (`app.deadline_bound`); as
    `cancelled` when its user had asked it to stop. Frees its reservation and slot. `unless`, asked first in the
    same transaction, can call the end off (`dead_letters.requeued`). Returns the status written, None when the
    turn was not ended here."""
    # Read before the transaction, which holds the turn's lock: a processing turn's readers may hold text of
    # its dead delivery's call (none for one pending).
    streamed = None if pending_before is not None else text_streamed(turn_id)
    with transaction() as session:
        ended = None if unless is not None and unless(session) else end_unowned(
            session, turn_id, TurnStatus.ERROR, reason, pending_before=pending_before,
            deadline_before=deadline_before, streamed=streamed)
    if ended is None:
        return None
    announce_unowned_end(ended)
    return ended.status
