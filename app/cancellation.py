"""Stopping a turn on a user's request: a stop, or deleting the turn's conversation.

A pending turn is cancelled at once (no worker has it), and so is a processing one that no delivery holds
(its worker died, or a failed delivery handed it to a retry). A processing turn is flagged in the
database and in Redis; the worker's lease keeper notices within half a second, its watchdog closes
the upstream connection, and the worker settles the turn as `cancelled` with the text so far,
charging the tokens generated; the answer to a stop or to a delete waits for that end. Either way the
conversation and the user's slot are freed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.auth import Principal
from app.config import get_settings
from app.conversations import owned_conversation, owned_turn_of
from app.db import rows_changed, transaction
from app.errors import NotFound
from app.in_flight import answer_in_flight
from app.models import Conversation, ConversationMessage, table
from app.models.base import utc_now
from app.outages import is_outage
from app.stop_bound import end_stopped_turns, end_stops_of_gone_holders
from app.stop_requests import publish_stop
from app.turn_state import request_stop
from app.turn_status import STOPPED, TurnStatus
from app.unheld_ends import UnownedEnd, announce_unowned_end, end_unowned


def cancel_turn(principal: Principal, message_id: int) -> ConversationMessage:
    """Ask the turn of `message_id` (its answer or its user message) to stop; returns that message as it is
    then (already ended turns are left as they are).

    A processing turn is ended by its worker, within about half a second: the answer waits up to
    `AGENTQ_CANCEL_WAIT_SECONDS` for that end, so that it carries the turn `cancelled` with its text and
    the conversation free, as the contract words a stop. Answered at once, a client's next message was
    refused as `conversation_busy` for that half second. A turn whose worker has left the workers' list and gone
    silent (it died) is ended here, with no wait; one whose worker died too recently for both is answered
    `processing` after the wait, and ended by the delivery that takes it over or by an API process's look."""
    with transaction() as session:
        stopped = _stop(session, owned_turn_of(session, principal.id, message_id))
        message = session.get_one(ConversationMessage, message_id)
    _announce(stopped)
    if stopped is not None and stopped.ends_after_commit:
        return _ended_if_its_worker_is_gone(stopped.turn_id, message_id) or _once_ended(message_id) or message
    return message


def _ended_if_its_worker_is_gone(turn_id: int, message_id: int) -> ConversationMessage | None:
    """Message `message_id` once its turn is ended here, before any wait, because the worker holding it has left
    the workers' list and gone silent (`app.stop_bound.end_stops_of_gone_holders`); None when it has not (its worker
    is listed or renewing, or the list cannot be believed yet: the worker, the delivery that takes the turn over, or
    an API process's look ends it), or the database stopped answering meanwhile (the stop is recorded either way)."""
    try:
        if not end_stops_of_gone_holders(only=turn_id):
            return None
        with transaction() as session:
            return session.get_one(ConversationMessage, message_id)
    except Exception as error:
        if not is_outage(error):
            raise
        return None


def _once_ended(message_id: int) -> ConversationMessage | None:
    """Message `message_id` once its turn has ended (both messages of a turn change status in one UPDATE);
    None if it has not within the wait, or the database stopped answering meanwhile (the stop is recorded
    either way)."""
    give_up_at = time.monotonic() + get_settings().cancel_wait_seconds
    pause = 0.02
    while time.monotonic() + pause <= give_up_at:
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)
        try:
            with transaction() as session:
                message = session.get_one(ConversationMessage, message_id)
        except Exception as error:
            if not is_outage(error):
                raise
            return None
        if TurnStatus(message.status).is_terminal:
            return message
    return None


def delete_conversation(principal: Principal, conversation_id: int) -> None:
    """Hide a conversation from its user at once (its messages and charges stay for accounting), and stop
    the turn it has in flight: deleting is the user's last word on it, and once the conversation is hidden
    they could no longer stop a turn that would otherwise run, be charged and hold one of their slots.

    A turn being accepted meanwhile is invisible to the first look, but its commit comes before the
    delete's (the delete's UPDATE waits for the row the intake holds) or it is refused (the intake checks
    `deleted_at` on the committed row): a second look, after the delete's commit, stops it. It is a
    transaction of its own because taking the conversation's row before a turn's, in one, would deadlock
    with a settling turn, which takes them the other way round.

    Like a stop's answer, the 204 waits (`AGENTQ_CANCEL_WAIT_SECONDS` at most) for the worker to end a
    processing turn it stopped: answered at once, the user's next message elsewhere was refused for that
    half second, their slot still held by the deleted conversation's turn."""
    with transaction() as session:
        owned_conversation(session, principal, conversation_id)
        stopped = _stop_in_flight(session, conversation_id)
        # Guarded, so that of two deletes at once the second finds it deleted (404) once the first commits.
        if not rows_changed(session, update(Conversation).where(Conversation.id == conversation_id,
                                                               Conversation.deleted_at.is_(None))
                            .values(deleted_at=utc_now())):
            raise NotFound("No such conversation.")
    if stopped is None:
        with transaction() as session:
            stopped = _stop_in_flight(session, conversation_id)
    _announce(stopped)
    if (stopped is not None and stopped.ends_after_commit
            and _ended_if_its_worker_is_gone(stopped.turn_id, stopped.turn_id) is None):
        _once_ended(stopped.turn_id)


def _stop_in_flight(session: Session, conversation_id: int) -> _Stopped | None:
    in_flight = session.scalar(select(ConversationMessage.id).where(
        ConversationMessage.conversation_id == conversation_id, answer_in_flight(table(ConversationMessage))))
    return None if in_flight is None else _stop(session, in_flight)


@dataclass(frozen=True, slots=True)
class _Stopped:
    turn_id: int
    cancelled: UnownedEnd | None
    """What a pending turn, cancelled here, held; None for a processing one, which its worker ends, or
    `_announce` after the stop's commit when no delivery holds it (`unheld`)."""
    unheld: bool = False
    """A processing turn that no delivery holds, ended after the stop's commit (`_announce`)."""

    @property
    def ends_after_commit(self) -> bool:
        """The turn ends after the stop's commit (by its worker, or by `_announce`): the answer waits for it."""
        return self.cancelled is None


def _stop(session: Session, message_id: int) -> _Stopped | None:
    """In the caller's transaction: cancel a pending turn, or flag a processing one for its worker, which
    settles it; None when the turn had already ended."""
    recorded = request_stop(session, message_id)
    if recorded is None:
        return None
    if recorded.status is not TurnStatus.PENDING:
        return _Stopped(message_id, None, unheld=not recorded.held)
    return _Stopped(message_id, end_unowned(session, message_id, TurnStatus.CANCELLED, STOPPED))


def _announce(stopped: _Stopped | None) -> None:
    """After the commit: tell the worker through Redis, and free what a cancelled pending turn held. A
    processing turn no delivery holds (its worker died; a failed delivery handed it to a retry) is ended
    `cancelled` now, with the text its readers were sent, as the bounds end such a turn (`app.unheld_ends`):
    flagged only, it stayed `processing`, its conversation busy, until another worker took it over, which
    with none running was the deadline bound's end, minutes later."""
    if stopped is None:
        return
    publish_stop(stopped.turn_id)
    if stopped.cancelled is not None:
        announce_unowned_end(stopped.cancelled)
    elif stopped.unheld:
        end_stopped_turns([stopped.turn_id])
