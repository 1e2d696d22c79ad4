"""Which turns are in flight: the database's answer to "is this conversation busy" and "how many for a user".

The API's checks (`app.turn_intake`) and the Redis fast path's confirmation of a refusal
(`app.coordination`) ask the same questions, so they ask them here.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import get_settings
from app.errors import TooManyActiveConversations
from app.models import ConversationMessage, Turn, User
from app.turn_status import IN_FLIGHT_VALUES


def conversation_in_flight(session: Session, conversation_id: int) -> bool:
    return session.scalar(
        select(ConversationMessage.id).where(
            ConversationMessage.conversation_id == conversation_id,
            ConversationMessage.role == "assistant",
            ConversationMessage.status.in_(IN_FLIGHT_VALUES),
        )
    ) is not None


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


def check_user_limit(session: Session, user_id: int) -> None:
    """Refuse one more conversation in flight past AGENTQ_MAX_ACTIVE_CONVERSATIONS (the user row is locked)."""
    limit = get_settings().max_active_conversations
    if len(active_conversation_ids(session, user_id)) >= limit:
        raise TooManyActiveConversations(limit)
