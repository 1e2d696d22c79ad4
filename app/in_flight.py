"""Which turns are in flight, and the rules of starting one: "is this conversation busy", "how many for a user".

The API's checks (`app.turn_intake`) and the Redis fast path's confirmation of a refusal
(`app.conversation_locks`) ask the same questions, so they ask them here.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, SQLColumnExpression, Table, and_, bindparam, literal_column, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.db import transaction
from app.errors import ConversationBusy, TooManyActiveConversations
from app.models import Conversation, ConversationMessage, User, table
from app.prepared import Batch, Prepared, Unit, then
from app.turn_status import IN_FLIGHT_VALUES, TurnStatus


def status_is(status: SQLColumnExpression[str], *values: str) -> ColumnElement[bool]:
    """`status` is one of `values`, written as constants: a prepared statement's generic plan can then
    use the partial indexes whose predicate says the same (a parameter could be anything)."""
    constants: list[ColumnElement[str]] = [literal_column(f"'{value}'") for value in values]
    return status == constants[0] if len(constants) == 1 else status.in_(constants)


def in_flight(status: SQLColumnExpression[str]) -> ColumnElement[bool]:
    """A run not yet ended (`IN_FLIGHT_VALUES`): what the conversation's lock, the user's limit and the recovery
    sweep count, asked of the database in one shape (`status_is`)."""
    return status_is(status, *IN_FLIGHT_VALUES)


def pending_since_before(status: SQLColumnExpression[str], since: SQLColumnExpression[datetime],
                         moment: Any) -> ColumnElement[bool]:
    """`status` is pending, and has been since before `moment` (`since` is when it last changed): what
    `AGENTQ_MAX_PENDING_SECONDS` ends, read by the recovery sweep and judged again under the turn's lock."""
    return and_(status_is(status, TurnStatus.PENDING.value), since < moment)


def processing_past(status: SQLColumnExpression[str], deadline_at: SQLColumnExpression[datetime | None],
                    moment: Any) -> ColumnElement[bool]:
    """`status` is processing, and the run's deadline came before `moment`: what `app.deadline_bound` ends when
    no worker holds the run, read by the recovery sweep and judged again under the run's lock."""
    return and_(status_is(status, TurnStatus.PROCESSING.value), deadline_at < moment)


def answer_in_flight(messages: Table) -> ColumnElement[bool]:
    """An assistant message of a turn still in flight: the predicate of `uq_conversation_messages_in_flight`."""
    return and_(messages.c.role == literal_column("'assistant'"), in_flight(messages.c.status))


def answer_status(message_id: int) -> TurnStatus | None:
    """A turn's status as its answer's row says now, read in a transaction of its own; None when the row is
    gone. For a reader of Redis's side of a turn (its lock, its live stream), whose entries a dead worker may
    have left: the database says whether the turn has ended."""
    with transaction() as session:
        status = session.scalar(select(ConversationMessage.status).where(ConversationMessage.id == message_id))
    return None if status is None else TurnStatus(status)


def active_conversation_ids(session: Session, user_id: int) -> set[int]:
    """The user's conversations with a turn pending or processing (what the per-user limit counts)."""
    return set(_statements().active(session, {"user": user_id}).scalars())


def check_can_start(unit: Unit | Batch, user_id: int, conversation_id: int) -> None:
    """The two rules of starting a turn, from one query (the user's row is locked by the caller):
    409 while this conversation has a turn in flight, 429 at AGENTQ_MAX_ACTIVE_CONVERSATIONS.
    On a batch the query goes out with the batch and the rules are checked once it is back."""
    active = _statements().active(unit, {"user": user_id})

    def check() -> None:
        ids = set(active.scalars())
        if conversation_id in ids:
            raise ConversationBusy()
        limit = get_settings().max_active_conversations
        if len(ids) >= limit:
            raise TooManyActiveConversations(limit)

    then(unit, check)


class _Statements(NamedTuple):
    active: Prepared
    lock_user: Prepared


@cache
def _statements() -> _Statements:
    """Built once on the Core tables and run on the driver (`app.prepared`): every accepted turn asks these.

    `active` starts from the user's conversations and probes the partial unique index of answers in
    flight (`answer_in_flight`), so its cost follows the number of the user's conversations, not of
    every turn they ever had."""
    conversations, messages, users = table(Conversation), table(ConversationMessage), table(User)
    return _Statements(
        active=Prepared(select(messages.c.conversation_id)
                        .join_from(conversations, messages, messages.c.conversation_id == conversations.c.id)
                        .where(conversations.c.user_id == bindparam("user"), answer_in_flight(messages))),
        lock_user=Prepared(select(users.c.id).where(users.c.id == bindparam("user")).with_for_update()),
    )


def lock_user(session: Session, user_id: int) -> None:
    """Serialise what one user does that a check must see whole: a requeue's limit check, a new
    conversation's de-duplication (a turn's intake takes the same lock in its own first batch)."""
    _statements().lock_user(session, {"user": user_id})

