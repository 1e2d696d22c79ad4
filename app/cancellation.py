"""Stopping a turn on a user's request: a stop, or deleting the turn's conversation.

A pending turn is cancelled at once (no worker has it). A processing turn is flagged in the
database and in Redis; the worker's lease keeper notices within half a second, its watchdog closes
the upstream connection, and the worker settles the turn as `cancelled` with the text so far,
charging the tokens generated. Either way the conversation and the user's slot are freed.
"""

from __future__ import annotations

from sqlalchemy import select

from app import coordination
from app.auth import Principal
from app.conversations import owned_conversation, record_turn_end
from app.db import transaction
from app.errors import NotFound
from app.in_flight import answer_in_flight
from app.live_stream import TurnStream
from app.models import ConversationMessage, Turn, table
from app.models.base import utc_now
from app.stop_requests import publish_stop
from app.turn_state import fail_turn_unowned
from app.turn_status import TurnStatus

STOPPED = "stopped on request"


def cancel_turn(principal: Principal, message_id: int) -> ConversationMessage:
    """Ask a turn to stop; returns its message as it is now (already ended turns are left as they are)."""
    with transaction() as session:
        message = session.get(ConversationMessage, message_id)
        if message is None or message.role != "assistant":
            raise NotFound("No such assistant message.")
        owned_conversation(session, principal, message.conversation_id)
    _stop(message_id)
    with transaction() as session:
        return session.get_one(ConversationMessage, message_id)


def delete_conversation(principal: Principal, conversation_id: int) -> None:
    """Hide a conversation from its user at once (its messages and charges stay for accounting), and stop
    the turn it has in flight: deleting is the user's last word on it, and once the conversation is hidden
    they could no longer stop a turn that would otherwise run, be charged and hold one of their slots."""
    with transaction() as session:
        conversation = owned_conversation(session, principal, conversation_id)
        in_flight = session.scalar(select(ConversationMessage.id).where(
            ConversationMessage.conversation_id == conversation_id, answer_in_flight(table(ConversationMessage))))
        conversation.deleted_at = utc_now()
    if in_flight is not None:
        _stop(in_flight)


def _stop(message_id: int) -> None:
    """A pending turn is cancelled here; a processing one is flagged for its worker, which settles it."""
    cancelled_pending = False
    with transaction() as session:
        turn = session.execute(
            select(Turn).where(Turn.assistant_message_id == message_id).with_for_update()
        ).scalar_one()
        status = session.scalar(select(ConversationMessage.status).where(ConversationMessage.id == message_id))
        if TurnStatus(status).is_terminal:
            return
        turn.cancel_requested_at = utc_now()
        if status == TurnStatus.PENDING:
            fail_turn_unowned(session, message_id, TurnStatus.CANCELLED, STOPPED)
            record_turn_end(session, turn.conversation_id, None)
            cancelled_pending = True
        held = coordination.HeldTurn(message_id, turn.user_id, turn.conversation_id)
    publish_stop(message_id)
    if cancelled_pending:
        coordination.release(held)
        TurnStream(message_id).finished(TurnStatus.CANCELLED, None)
