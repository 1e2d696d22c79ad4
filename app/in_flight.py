"""Which turns are in flight, and the rules of starting one: "is this conversation busy", "how many for a user".

The API's checks (`app.turn_intake`) and the Redis fast path's confirmation of a refusal
(`app.coordination`) ask the same questions, so they ask them here.
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

from sqlalchemy import bindparam, literal_column, select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.errors import ConversationBusy, TooManyActiveConversations
from app.models import Conversation, ConversationMessage, User, table
from app.prepared import Batch, Prepared, then
from app.turn_status import IN_FLIGHT_VALUES


def active_conversation_ids(session: Session, user_id: int) -> set[int]:
    """The user's conversations with a turn pending or processing (what the per-user limit counts)."""
    return set(_statements().active(session, {"user": user_id}).scalars())


def check_can_start(unit: Session | Batch, user_id: int, conversation_id: int) -> None:
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


@cache
def _statements() -> SimpleNamespace:
    """Built once on the Core tables and run on the driver (`app.prepared`): every accepted turn asks these.

    `active` starts from the user's conversations and probes the partial unique index of answers in
    flight (`uq_conversation_messages_in_flight`), so its cost follows the number of the user's
    conversations, not of every turn they ever had. The index's predicate is repeated as constants,
    not parameters: a prepared statement's generic plan could not prove a parameter matches it."""
    conversations, messages, users = table(Conversation), table(ConversationMessage), table(User)
    return SimpleNamespace(
        active=Prepared(select(messages.c.conversation_id)
                        .join_from(conversations, messages, messages.c.conversation_id == conversations.c.id)
                        .where(conversations.c.user_id == bindparam("user"),
                               messages.c.role == literal_column("'assistant'"),
                               messages.c.status.in_([literal_column(f"'{status}'") for status in IN_FLIGHT_VALUES]))),
        lock_user=Prepared(select(users.c.id).where(users.c.id == bindparam("user")).with_for_update()),
    )


def lock_user(session: Session, user_id: int) -> None:
    """Serialise a user's turn starts, so the per-user limit and idempotency keys hold under concurrency."""
    _statements().lock_user(session, {"user": user_id})

