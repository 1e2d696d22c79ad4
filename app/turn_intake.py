"""Accepting a turn: the user's message and the assistant's placeholder, both `pending`.

The rows, the sequence numbers and the busy/limit checks are one transaction on the database, which
is the authority (a Redis fast path may refuse earlier, never accept alone). The Dramatiq message
is sent only after the commit; a failed send leaves `enqueued_at` empty and recovery sends it later.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import NamedTuple

from sqlalchemy import BigInteger, DateTime, String, Text, and_, bindparam, insert, literal, select, union_all, update
from sqlalchemy.exc import IntegrityError

from app import conversation_locks, outbox
from app.auth import Principal
from app.config import get_settings
from app.conversations import require_owned
from app.db import plain_transaction, transaction
from app.errors import (
    ContentTooLarge,
    ConversationBusy,
    NotFound,
    TooManyActiveConversations,
    TooManyTurns,
    ValidationFailed,
)
from app.in_flight import check_can_start
from app.models import Agent, Conversation, ConversationMessage, Turn, User, table
from app.models.base import utc_now
from app.prepared import Batch, Prepared, Rows, Unit
from app.run_kinds import TURN
from app.text import unstorable
from app.turn_rate import take_turn_token
from app.turn_status import TurnStatus


@dataclass(frozen=True, slots=True)
class AcceptedTurn:
    user_message: ConversationMessage
    assistant_message: ConversationMessage
    replayed: bool = False

    @property
    def enqueued_at(self) -> datetime:
        """The new turn's outbox mark, written with the same time as its messages."""
        return self.assistant_message.created_at

    def as_first_answered(self) -> AcceptedTurn:
        """The turn as its first answer showed it: both messages `pending`, the answer empty. A retried POST
        is given that answer again, byte for byte (the contract's "return the first answer"), whatever the
        turn has come to since; the message's own routes and its stream tell that."""
        question, answer = self.user_message, self.assistant_message
        return AcceptedTurn(as_accepted(question.id, question.conversation_id, question.seq, "user", question.content,
                                        question.created_at),
                            as_accepted(answer.id, answer.conversation_id, answer.seq, "assistant", "",
                                        answer.created_at), replayed=self.replayed)


def as_accepted(ident: int, conversation_id: int, seq: int, role: str, content: str,
                at: datetime) -> ConversationMessage:
    """A message of a turn as the turn's acceptance answers it, for the first request and for its replays."""
    return ConversationMessage(id=ident, conversation_id=conversation_id, seq=seq, role=role, content=content,
                               status=TurnStatus.PENDING.value, created_at=at, updated_at=at)


def check_content(content: str) -> None:
    """The checks of a message's text, for every caller: the API's schema checks storable text before this,
    the command line does not."""
    if not content.strip():
        raise ValidationFailed("content must not be empty.")
    limit = get_settings().max_content_chars
    if len(content) > limit:
        raise ContentTooLarge(f"content is {len(content)} characters; the limit is {limit}.")
    if (problem := unstorable(content)) is not None:
        raise ValidationFailed(f"content {problem}.")


def _replay(unit: Unit, user_id: int, key: str, conversation_id: int, content: str) -> AcceptedTurn | None:
    """The first answer to a request with this Idempotency-Key, if there was one.

    A key names one request: reusing it for another conversation or other content is the client's
    mistake, not a retry, and answering it with the first turn would drop the new message unseen.
    """
    turns, messages = table(Turn), table(ConversationMessage)
    turn = unit.execute(select(turns.c.conversation_id, turns.c.user_message_id, turns.c.assistant_message_id)
                        .where(turns.c.user_id == user_id, turns.c.idempotency_key == key)).first()
    if turn is None:
        return None
    if turn.conversation_id != conversation_id:
        raise ValidationFailed("This Idempotency-Key was already used for another conversation.",
                               code="idempotency_key_reused")
    rows = unit.execute(select(messages).where(messages.c.id.in_([turn.user_message_id,
                                                                  turn.assistant_message_id])))
    found = {row.id: ConversationMessage(**row._asdict()) for row in rows}
    if found[turn.user_message_id].content != content:
        raise ValidationFailed("This Idempotency-Key was already used for a message with other content.",
                               code="idempotency_key_reused")
    return AcceptedTurn(found[turn.user_message_id], found[turn.assistant_message_id], replayed=True)


class _Statements(NamedTuple):
    lock_owner: Prepared
    bump_seq: Prepared
    insert_messages: Prepared
    insert_turn: Prepared


@cache
def _statements() -> _Statements:
    """The statements of every accepted turn, built once on the Core tables and run on the driver.

    The two messages take their seq numbers from the conversation's counter as `bump_seq` left it,
    and the turn row its ids from the two messages, in SQL: the three writes need nothing from each
    other in Python, so they go out in one batch (`app.prepared.Batch`)."""
    users, conversations, messages, turns = table(User), table(Conversation), table(ConversationMessage), table(Turn)
    agents = table(Agent)
    at = bindparam("at", type_=DateTime(timezone=True))
    this = (conversations.c.id == bindparam("conversation", type_=BigInteger), conversations.c.deleted_at.is_(None))
    question, answer = messages.alias("question"), messages.alias("answer")
    new_message = ("conversation_id", "seq", "role", "content", "status", "created_at", "updated_at")
    pending = literal(TurnStatus.PENDING.value)
    return _Statements(
        lock_owner=Prepared(select(users.c.id, agents.c.deleted_at.label("agent_deleted_at"))
                            .join_from(conversations, users, users.c.id == conversations.c.user_id)
                            .join(agents, agents.c.id == conversations.c.agent_id)
                            .where(*this, conversations.c.user_id == bindparam("user"))
                            .with_for_update(of=users)),
        bump_seq=Prepared(update(conversations).where(*this)
                          .values(message_count=conversations.c.message_count + 2, updated_at=at)
                          .returning(conversations.c.message_count)),
        insert_messages=Prepared(insert(messages).from_select(new_message, union_all(
            select(conversations.c.id, conversations.c.message_count - 1, literal("user"),
                   bindparam("content", type_=Text), pending, at, at).where(*this),
            select(conversations.c.id, conversations.c.message_count, literal("assistant"), literal(""),
                   pending, at, at).where(*this),
        )).returning(messages.c.id, messages.c.seq)),
        insert_turn=Prepared(insert(turns).from_select(
            ("assistant_message_id", "user_message_id", "conversation_id", "user_id", "idempotency_key",
             "enqueued_at", "created_at", "updated_at"),
            select(answer.c.id, question.c.id, conversations.c.id, bindparam("user", type_=BigInteger),
                   bindparam("key", type_=String), at, at, at)
            .select_from(conversations
                         .join(answer, and_(answer.c.conversation_id == conversations.c.id,
                                            answer.c.seq == conversations.c.message_count))
                         .join(question, and_(question.c.conversation_id == conversations.c.id,
                                              question.c.seq == conversations.c.message_count - 1)))
            .where(*this))),
    )


def _insert_turn(
    unit: Unit, principal: Principal, conversation_id: int, content: str, key: str | None
) -> AcceptedTurn:
    """One transaction: the user's row lock (which also proves ownership), checks, seq numbers, three rows.

    Two round trips and the commit: the lock with the busy/limit query, then the three writes. A
    request with an Idempotency-Key looks for its first answer between the two, before the checks
    (its own turn may be the one in flight).

    The conversation is not locked with the user (a settling turn takes them in the other order), so
    the read of `deleted_at` may predate a wait for the user's lock; the seq update checks it again
    on the committed row, and a conversation deleted meanwhile is 404."""
    sql = _statements()
    ids = {"conversation": conversation_id, "user": principal.id}
    with Batch(unit) as batch:
        owner = sql.lock_owner(batch, ids)
        batch.then(lambda: _require_open_to_new_turns(owner))
        if key is None:
            check_can_start(batch, principal.id, conversation_id)
    if key is not None:
        replay = _replay(unit, principal.id, key, conversation_id, content)
        if replay is not None:
            return replay
        check_can_start(unit, principal.id, conversation_id)
    now = utc_now()
    with Batch(unit) as batch:
        seq = sql.bump_seq(batch, {"conversation": conversation_id, "at": now})
        inserted = sql.insert_messages(batch, {"conversation": conversation_id, "at": now, "content": content})
        sql.insert_turn(batch, {**ids, "key": key, "at": now})
        batch.then(lambda: _require_found(seq))
    last_seq: int = seq.one().message_count
    message_ids = {row.seq: row.id for row in inserted}

    def written(seq: int, role: str, text: str) -> ConversationMessage:
        return as_accepted(message_ids[seq], conversation_id, seq, role, text, now)

    return AcceptedTurn(written(last_seq - 1, "user", content), written(last_seq, "assistant", ""))


def _require_found(rows: Rows) -> None:
    if rows.first() is None:
        raise NotFound("No such conversation.")


def _require_open_to_new_turns(owner: Rows) -> None:
    """The caller's conversation, whose agent still takes work: a deleted agent answers no new message
    (its turns in flight finish), and its models may be deleted after it."""
    _require_found(owner)
    if owner.one().agent_deleted_at is not None:
        raise NotFound("This conversation's agent was deleted; it takes no new messages.", code="agent_deleted")


def _owned_replay(principal: Principal, conversation_id: int, key: str | None, content: str) -> AcceptedTurn | None:
    """404 for another user's conversation, checked before any refusal or replay so that none tells a
    conversation exists; then the first answer to this Idempotency-Key, or None (always None without one)."""
    with transaction() as session:
        require_owned(session, principal, conversation_id)
        return _replay(session, principal.id, key, conversation_id, content) if key is not None else None


def _answered_again(replay: AcceptedTurn) -> AcceptedTurn:
    """A replay's answer: the first one again (`AcceptedTurn.as_first_answered`). Its turn, if still pending,
    is sent again (`app.outbox.resend`, at most once a grace): its first request may have committed and died
    before its send, and a second message is harmless (the claim runs a turn once)."""
    if replay.assistant_message.status == TurnStatus.PENDING:
        outbox.resend(TURN, replay.assistant_message.id, replay.enqueued_at)
    return replay.as_first_answered()


def submit_turn(principal: Principal, conversation_id: int, content: str, idempotency_key: str | None) -> AcceptedTurn:
    """Accept one turn (202) or refuse it: 404 not theirs, 409 busy, 429 over the per-user limits (turns in flight,
    turns a minute: `app.turn_rate`), 413/422 bad content.

    Whoever refuses (the content check, the Redis fast path or the database), another user's conversation is 404 first,
    so a refusal never tells anyone that a conversation exists or is busy; and a request with an
    Idempotency-Key whose first request committed meanwhile gets that first answer, not a refusal.
    """
    try:
        check_content(content)
    except (ContentTooLarge, ValidationFailed):
        _owned_replay(principal, conversation_id, None, content)  # another user's conversation is 404 first
        raise
    if idempotency_key is not None and (replay := _owned_replay(principal, conversation_id, idempotency_key, content)):
        return _answered_again(replay)
    try:
        take_turn_token(principal.id)
    except TooManyTurns:
        _owned_replay(principal, conversation_id, None, content)  # another user's conversation is 404 first
        raise
    try:
        lock = conversation_locks.acquire_turn_slots(principal.id, conversation_id)
    except (ConversationBusy, TooManyActiveConversations):
        if replay := _owned_replay(principal, conversation_id, idempotency_key, content):
            return _answered_again(replay)
        raise
    try:
        with plain_transaction() as connection:
            accepted = _insert_turn(connection, principal, conversation_id, content, idempotency_key)
    except IntegrityError as exc:
        lock.release()
        if replay := _owned_replay(principal, conversation_id, idempotency_key, content):
            return _answered_again(replay)
        raise ConversationBusy() from exc
    except BaseException:
        lock.release()
        raise
    if accepted.replayed:
        lock.release()
        return _answered_again(accepted)
    lock.bind(accepted.assistant_message.id)
    if lock.redis_silent:
        outbox.leave_for_recovery(TURN, accepted.assistant_message.id)
    else:
        outbox.send(TURN, accepted.assistant_message.id, accepted.enqueued_at)
    return accepted
