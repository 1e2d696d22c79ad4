"""What is sent upstream for a turn: the agent's system prompt, the history that fits, the new message.

The worker and the admin prompt preview both call `build_prompt`, so the preview is exactly what
a turn would send. History is the conversation's successful turns only (a failed or cancelled turn
never becomes context), trimmed oldest-first to fit the model's context window with room for the
answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sqlalchemy import bindparam, select

from app.config import get_settings
from app.models import ConversationMessage, table
from app.prepared import Prepared, Unit
from app.token_estimates import estimate_message_tokens, estimate_tokens_of_messages
from app.turn_status import TurnStatus

ChatMessage = dict[str, str]


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: list[ChatMessage]
    estimated_tokens: int


@cache
def _history_query() -> Prepared:
    """Built once on the Core table and run on the driver (`app.prepared`): every turn reads its history."""
    messages = table(ConversationMessage)
    return Prepared(
        select(messages.c.role, messages.c.content)
        .where(messages.c.conversation_id == bindparam("conversation"),
               messages.c.status == TurnStatus.SUCCESS.value, messages.c.seq < bindparam("before"))
        .order_by(messages.c.seq)
    )


def successful_history(session: Unit, conversation_id: int, before_seq: int | None = None) -> list[ChatMessage]:
    """The conversation's successful turns before `before_seq` (all of them when it is None), oldest first."""
    rows = _history_query()(session, {"conversation": conversation_id,
                                      "before": before_seq if before_seq is not None else 2**31 - 1})
    return [{"role": role, "content": content} for role, content in rows]


def history_before(session: Unit, conversation_id: int, seq: int) -> list[ChatMessage]:
    """What a turn's prompt carries before its question (its message number `seq`): the conversation's
    successful turns before it, and no query for a conversation's first turn, which has none."""
    return successful_history(session, conversation_id, before_seq=seq) if seq > 1 else []


def build_prompt(
    system_prompt: str, history: list[ChatMessage], content: str, *, context_window: int | None,
    max_tokens: int | None,
) -> Prompt:
    settings = get_settings()
    window = settings.context_window(context_window)
    answer_room = settings.answer_limit(max_tokens)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    tail = [{"role": "user", "content": content}]
    budget = window - answer_room - estimate_tokens_of_messages(head + tail)
    kept: list[ChatMessage] = []
    for message in reversed(history):
        cost = estimate_message_tokens(message)
        if cost > budget:
            break
        kept.append(message)
        budget -= cost
    kept.reverse()
    if kept and kept[0]["role"] == "assistant":
        kept = kept[1:]
    messages = head + kept + tail
    return Prompt(messages, estimate_tokens_of_messages(messages))
