"""Ending a turn that no worker holds: its message died (retries ran out), or it was stopped while pending.

A worker settles the turns it runs itself (`app.turn_runner`); these two ends have no worker, so
they free what the turn held themselves, in the same two steps: the ending in the caller's
transaction (`end_unowned`), and after its commit the conversation's lock, the user's slot and the
readers of the live stream (`announce_unowned_end`). Before the commit they would let a new turn
start, or a reader see `done`, while the ending could still be rolled back.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from app import coordination
from app.conversations import record_turn_end
from app.live_stream import TurnStream
from app.turn_state import end_turn_unowned
from app.turn_status import TurnStatus


def end_unowned(session: Session, turn_id: int, status: TurnStatus, reason: str) -> coordination.HeldTurn | None:
    """In the caller's transaction; None when the turn was not ended here (it had ended, or a live lease
    says a worker runs it)."""
    turn = end_turn_unowned(session, turn_id, status, reason)
    if turn is None:
        return None
    record_turn_end(session, turn.conversation_id, None)
    return coordination.HeldTurn(turn_id, turn.user_id, turn.conversation_id)


def announce_unowned_end(held: coordination.HeldTurn, status: TurnStatus) -> None:
    coordination.release(held)
    TurnStream(held.turn_id).finished(status, None)
