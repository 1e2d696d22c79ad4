"""Conversations a user owns: creating (with de-duplication), listing, reading their messages, and the
statistics a turn's settlement adds to (`record_turn_end`). Deleting one stops its turn in flight, so it
lives with stopping, in `app.cancellation`.

Another user's conversation, or a deleted one, is simply not found: ownership is part of every query.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import BigInteger, ColumnElement, Select, bindparam, inspect, or_, select, update
from sqlalchemy.orm import Session

from app.auth import Principal
from app.catalog import live_agent
from app.config import get_settings
from app.db import transaction
from app.errors import NotFound
from app.in_flight import lock_user
from app.live_stream import text_so_far
from app.models import Conversation, ConversationMessage, Turn, table
from app.models.base import utc_now
from app.paging import every_row, moment_cursor, older_than, page_of
from app.prepared import Batch, Prepared, Unit
from app.turn_status import TurnStatus


@dataclass(frozen=True, slots=True)
class CreatedConversation:
    conversation: Conversation
    created: bool


@dataclass(frozen=True, slots=True)
class ConversationPage:
    items: list[Conversation]
    next_cursor: str | None


def visible_to(user_id: int) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    """Who sees a conversation, and its messages: its user, until it is deleted. Another user's conversation,
    a deleted one and one that does not exist are the same 404, so ids reveal nothing."""
    return Conversation.user_id == user_id, Conversation.deleted_at.is_(None)


def owned_conversation(session: Session, principal: Principal, conversation_id: int) -> Conversation:
    conversation = session.scalar(
        select(Conversation).where(Conversation.id == conversation_id, *visible_to(principal.id)))
    if conversation is None:
        raise NotFound("No such conversation.")
    return conversation


def require_owned(session: Session, principal: Principal, conversation_id: int) -> None:
    """The same check as `owned_conversation`, without loading the row: for the hot path of a turn."""
    found = session.scalar(
        select(Conversation.id).where(Conversation.id == conversation_id, *visible_to(principal.id))
    )
    if found is None:
        raise NotFound("No such conversation.")


def create_conversation(
    principal: Principal, agent_id: int, project_id: int | None, title: str | None
) -> CreatedConversation:
    """Returns the user's empty conversation with the same agent and project made within the dedup window.

    Clients that double-submit "new chat" get one conversation, not two; the user row lock makes
    two concurrent requests agree.
    """
    window = get_settings().dedup_window_seconds
    with transaction() as session:
        lock_user(session, principal.id)
        live_agent(session, agent_id)
        if window > 0:
            existing = session.scalar(
                select(Conversation)
                .where(
                    *visible_to(principal.id),
                    Conversation.agent_id == agent_id,
                    Conversation.project_id.is_(None) if project_id is None
                    else Conversation.project_id == project_id,
                    Conversation.message_count == 0,
                    Conversation.created_at >= utc_now() - timedelta(seconds=window),
                )
                .order_by(Conversation.id.desc())
                .limit(1)
            )
            if existing is not None:
                return CreatedConversation(existing, created=False)
        conversation = Conversation(user_id=principal.id, agent_id=agent_id, project_id=project_id, title=title,
                                    message_count=0, total_tokens=0)
        session.add(conversation)
        session.flush()
        return CreatedConversation(conversation, created=True)


def list_conversations(principal: Principal, limit: int, cursor: str | None) -> ConversationPage:
    """Newest activity first, and only conversations where the assistant has answered successfully once."""
    query = (
        select(Conversation)
        .where(
            *visible_to(principal.id),
            Conversation.last_success_at.is_not(None),
        )
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        .limit(limit + 1)
    )
    if cursor:
        query = query.where(older_than(Conversation.updated_at, Conversation.id, cursor))
    with transaction() as session:
        rows = list(session.scalars(query))
    return ConversationPage(*page_of(rows, limit, lambda row: moment_cursor(row.updated_at, row.id)))


def get_conversation(principal: Principal, conversation_id: int) -> Conversation:
    with transaction() as session:
        return owned_conversation(session, principal, conversation_id)


MESSAGE_BATCH = 200


def list_messages(principal: Principal, conversation_id: int) -> Iterator[ConversationMessage]:
    """Every message of the conversation by `seq`: ownership is checked now (404 before anything is
    sent), the rows are read as the caller consumes them, `MESSAGE_BATCH` at a time, each batch in a
    short transaction of its own. A conversation can grow without bound (a turn stopped while pending
    costs nothing), so it is never held in memory whole, nor a connection held while a client reads."""
    with transaction() as session:
        owned_conversation(session, principal, conversation_id)
    return _messages_by_seq(conversation_id)


def _messages_by_seq(conversation_id: int) -> Iterator[ConversationMessage]:
    def read_page(after: int | None) -> tuple[list[ConversationMessage], int | None]:
        with transaction() as session:
            batch = list(session.scalars(
                select(ConversationMessage)
                .where(ConversationMessage.conversation_id == conversation_id, ConversationMessage.seq > (after or 0))
                .order_by(ConversationMessage.seq)
                .limit(MESSAGE_BATCH)))
            deliveries = _deliveries_of_answers_in_flight(session, batch)
        return [_as_read_now(m, deliveries) for m in batch], batch[-1].seq if len(batch) == MESSAGE_BATCH else None

    return every_row(read_page)


def _owned_message(columns: Any, user_id: int, message_id: int) -> Select[Any]:
    return (select(columns)
            .join(Conversation, Conversation.id == ConversationMessage.conversation_id)
            .where(ConversationMessage.id == message_id, *visible_to(user_id)))


def require_owned_answer(session: Session, user_id: int, message_id: int) -> None:
    """404 unless the message is the user's assistant message: the check alone, without loading the row
    (opening a stream)."""
    query = _owned_message(ConversationMessage.id, user_id, message_id).where(ConversationMessage.role == "assistant")
    if session.scalar(query) is None:
        raise NotFound("No such assistant message.")


def owned_turn_of(session: Session, user_id: int, message_id: int) -> int:
    """The turn (its assistant message's id) that the user's message `message_id`, either of the turn's two,
    belongs to: both carry the turn's status, so a stop may name either; 404 otherwise."""
    query = (select(Turn.assistant_message_id)
             .join(ConversationMessage, or_(Turn.assistant_message_id == ConversationMessage.id,
                                            Turn.user_message_id == ConversationMessage.id))
             .join(Conversation, Conversation.id == ConversationMessage.conversation_id)
             .where(ConversationMessage.id == message_id, *visible_to(user_id)))
    turn_id = session.scalar(query)
    if turn_id is None:
        raise NotFound("No such message.")
    return turn_id


def get_message(principal: Principal, message_id: int) -> ConversationMessage:
    with transaction() as session:
        message = session.scalar(_owned_message(ConversationMessage, principal.id, message_id))
        if message is None:
            raise NotFound("No such message.")
        deliveries = _deliveries_of_answers_in_flight(session, [message])
    return _as_read_now(message, deliveries)


def _deliveries_of_answers_in_flight(session: Session, messages: list[ConversationMessage]) -> dict[int, int]:
    """The delivery count of each turn whose answer among `messages` is being written (at most one a
    conversation), which says which part of its live stream is the run's now (`app.live_stream.text_so_far`)."""
    answering = [m.id for m in messages if m.role == "assistant" and m.status == TurnStatus.PROCESSING.value]
    if not answering:
        return {}
    rows = session.execute(select(Turn.assistant_message_id, Turn.deliveries)
                           .where(Turn.assistant_message_id.in_(answering)))
    return {turn_id: deliveries for turn_id, deliveries in rows}


def _as_read_now(message: ConversationMessage, deliveries: dict[int, int]) -> ConversationMessage:
    """An answer being written, with the text its stream's readers hold so far and the model writing it: the
    database has them only at the turn's end, and a client that polls the message (or was refused a stream,
    429 `too_many_streams`) would read an empty answer until then. Any other message as it is stored. A copy,
    never the loaded row, so that nothing of it can be written back."""
    if message.id not in deliveries or (streamed := text_so_far(message.id, deliveries[message.id])) is None:
        return message
    shown = {attribute.key: getattr(message, attribute.key) for attribute in inspect(ConversationMessage).column_attrs}
    return ConversationMessage(**{**shown, "content": streamed.text, "model": message.model or streamed.model})


def record_turn_end(unit: Unit | Batch, conversation_id: int, success_tokens: int | None) -> None:
    """Statistics at a turn's end: activity always; tokens and "has an answer" only for a success.

    `message_count` was already counted when the turn was accepted (it allocates the seq numbers).
    """
    now = utc_now()
    if success_tokens is None:
        _turn_end_statements().touch(unit, {"conversation": conversation_id, "at": now})
    else:
        _turn_end_statements().success(unit, {"conversation": conversation_id, "at": now, "tokens": success_tokens})


class _TurnEndStatements(NamedTuple):
    touch: Prepared
    success: Prepared


@cache
def _turn_end_statements() -> _TurnEndStatements:
    """Built once on the Core table (see `app.models.table`): every turn ends with one of these."""
    conversations = table(Conversation)
    this = conversations.c.id == bindparam("conversation")
    return _TurnEndStatements(
        touch=Prepared(update(conversations).where(this).values(updated_at=bindparam("at"))),
        success=Prepared(update(conversations).where(this).values(
            total_tokens=conversations.c.total_tokens + bindparam("tokens", type_=BigInteger),
            last_success_at=bindparam("at"), updated_at=bindparam("at"))),
    )
