"""Which turns are in flight, and the rules of starting one: "is this conversation busy", "how many for a user".

The API's checks (`app.turn_intake`) and the Redis fast path's confirmation of a refusal
(`app.coordination`) ask the same questions, so they ask them here.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.errors import ConversationBusy, TooManyActiveConversations
from app.models import ConversationMessage, Turn, User
from app.turn_status import IN_FLIGHT_VALUES


def active_conversation_ids(session: Session, user_id: int) -> set[int]:
    """The user's conversations with a turn pending or processing (what the per-user limit counts)."""
    return set(session.scalars(
        select(Turn.conversation_id)
        .join(ConversationMessage, ConversationMessage.id == Turn.assistant_message_id)
        .where(Turn.user_id == user_id, ConversationMessage.role == "assistant",
               ConversationMessage.status.in_(IN_FLIGHT_VALUES))
    ))


def lock_user(session: Session, user_id: int) -> None:
    """Serialise a user's turn starts, so the per-user limit and idempotency keys hold under concurrency."""
    session.execute(select(User.id).where(User.id == user_id).with_for_update())


def check_can_start(session: Session, user_id: int, conversation_id: int) -> None:
    """The two rules of starting a turn, from one query (the user's row is locked by the caller):
    409 while this conversation has a turn in flight, 429 at AGENTQ_MAX_ACTIVE_CONVERSATIONS."""
    active = active_conversation_ids(session, user_id)
    if conversation_id in active:
        raise ConversationBusy()
    limit = get_settings().max_active_conversations
    if len(active) >= limit:
        raise TooManyActiveConversations(limit)
