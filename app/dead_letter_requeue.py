"""Requeueing a dead letter: its run goes back to `pending` and to a worker, refused as a new one would be.

A requeue reopens the run (`error` -> `pending`) and marks the letter's row in one transaction (the row's lock
and its `requeued_at` let only one of two operators through), then takes the entry out of the broker and sends
a fresh message; a send that fails leaves the run for recovery to send. A requeued turn counts against its
conversation and its user's limit like a new turn (`app.in_flight.check_can_start`), and a deleted conversation
or agent takes no new work.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime

import redis
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import live_stream, outbox
from app.catalog import live_agent
from app.db import rows_changed, transaction
from app.dead_letter_queue import take_entry
from app.dead_letters import every_dead_letter, lock_open_letter
from app.debug_run_state import reopen_debug_run
from app.errors import Conflict, ConversationBusy, NotFound, TooManyActiveConversations, conversation_count
from app.in_flight import check_can_start, lock_user
from app.models import Conversation, DeadLetter, Turn
from app.models.base import utc_now
from app.run_kinds import TURN, kind_of, statuses_of_runs
from app.turn_state import refuse_unless_reopenable, reopen_turn
from app.turn_status import TransitionRefused

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RequeueOutcome:
    requeued: list[int]
    skipped: dict[int, str]
    """Dead letters left as they were, with the reason."""


def requeued(session: Session, redis_message_id: str) -> bool:
    """Whether the dead letter of this message was requeued, its row locked until the caller's commit: a
    requeue takes it first too, so it comes wholly before or after the caller's transaction. The worker ends a
    dead message's run after recording its letter, and a requeue in between (of a run already `error`: one
    given up, whose letter a listing may adopt from the broker at once) was undone: the requeued turn, pending
    again, was ended `error` with it, and its letter, marked requeued, was gone."""
    requeued_at = session.scalar(select(DeadLetter.requeued_at)
                                 .where(DeadLetter.redis_message_id == redis_message_id).with_for_update())
    return requeued_at is not None


def _hold_conversation_open(session: Session, row: DeadLetter, conversation_id: int) -> None:
    """Take the conversation's row unless it was deleted since it was read (409 `conversation_deleted`): a
    delete that committed between that read and this requeue's commit found no turn in flight to stop, and
    the requeued turn would run, and be charged, in a conversation its user can no longer see or stop. Held
    now, the row makes a delete wait for this commit, after which it finds the turn and stops it. Taken
    last, once no turn of the conversation is in flight, so no settlement (which takes the conversation
    before the user) holds it while this transaction holds the user."""
    if not rows_changed(session, update(Conversation).where(Conversation.id == conversation_id,
                                                            Conversation.deleted_at.is_(None))
                        .values(updated_at=utc_now())):
        raise _conversation_deleted(row)


def _conversation_deleted(row: DeadLetter) -> Conflict:
    return Conflict(f"Dead letter {row.id}: its conversation was deleted, so its turn is not run again.",
                    code="conversation_deleted")


def _reopen(session: Session, row: DeadLetter, enqueued_at: datetime) -> None:
    if row.run_id is None:
        raise Conflict(f"Dead letter {row.id} is a {row.actor!r} message that carries no run of agentq's, so "
                       "it cannot be requeued; purge it.")
    kind = kind_of(row.actor)
    assert kind is not None, "a run id is read only from a run's message (run_id_of)"
    if session.get(kind.model, row.run_id) is None:
        raise Conflict(f"Dead letter {row.id} names run {row.run_id}, which does not exist (a message written by "
                       "hand, or for another database), so it cannot be requeued; purge it.", code="run_not_found")
    try:
        with session.begin_nested():
            if kind is TURN:
                _reopen_turn(session, row, session.get_one(Turn, row.run_id), enqueued_at)
            else:
                # Its guarded UPDATE refuses a run no longer in error first, as a turn's status check does;
                # a refusal after it rolls the savepoint back.
                _refuse_if_agent_deleted(session, row, reopen_debug_run(session, row.run_id, enqueued_at))
    except TransitionRefused as exc:
        # Said with the run's status now (requeued already and running, or ended otherwise since its letter was
        # written), not as "no longer in error", which a run that never was misreads.
        status = statuses_of_runs(session, [(row.actor, row.run_id)]).get((row.actor, row.run_id))
        now = f"is {status}" if status is not None else "is gone"  # a row deleted by hand since its lookup
        raise Conflict(f"Dead letter {row.id}: its run {now}, not in error, so it cannot be requeued.",
                       code="run_not_in_error") from exc
    except IntegrityError as exc:
        raise _busy(row) from exc


def _reopen_turn(session: Session, row: DeadLetter, turn: Turn, enqueued_at: datetime) -> None:
    """A requeued turn is refused as a new one would be (a deleted conversation or agent, a busy conversation,
    the user's limit); its user's row is taken first, as a turn's intake takes it, so that the limit is judged
    with none of that user's intakes committing meanwhile (`lock_user`)."""
    lock_user(session, turn.user_id)
    refuse_unless_reopenable(session, turn)
    conversation = session.get_one(Conversation, turn.conversation_id)
    if conversation.deleted_at is not None:
        raise _conversation_deleted(row)
    _refuse_if_agent_deleted(session, row, conversation.agent_id)
    _check_user_can_start(session, row, turn)
    _hold_conversation_open(session, row, turn.conversation_id)
    reopen_turn(session, turn.assistant_message_id, enqueued_at)


def _refuse_if_agent_deleted(session: Session, row: DeadLetter, agent_id: int) -> None:
    """A deleted agent takes no new work, a turn's or an admin's test run, and its models may be gone; its row
    is read shared-locked (`live_agent`), so a requeue and a delete at once come out in one order or the other."""
    try:
        live_agent(session, agent_id, shared_lock=True)
    except NotFound:
        raise Conflict(f"Dead letter {row.id}: its agent was deleted, and takes no new work.",
                       code="agent_deleted") from None


def _busy(row: DeadLetter) -> ConversationBusy:
    return ConversationBusy(f"Dead letter {row.id}: its conversation has a turn in flight; requeue it when that "
                            "turn ends.")


def _check_user_can_start(session: Session, row: DeadLetter, turn: Turn) -> None:
    """A requeued turn counts against its conversation and its user's limit like a new one; the refusal
    is worded for the operator who asked, not for the user."""
    try:
        check_can_start(session, turn.user_id, turn.conversation_id)
    except ConversationBusy as exc:
        raise _busy(row) from exc
    except TooManyActiveConversations as exc:
        raise TooManyActiveConversations(exc.limit, f"Dead letter {row.id}: its user already has "
                                         f"{conversation_count(exc.limit)} with a turn in flight; requeue it when one "
                                         "ends.") from exc


def _send(row: DeadLetter) -> None:
    kind = kind_of(row.actor)
    assert kind is not None and row.run_id is not None
    if kind.streams_live:
        live_stream.forget(row.run_id)
    outbox.send(kind, row.run_id, row.requeued_at)


def requeue(dead_letter_id: int) -> RequeueOutcome:
    """Requeue one dead letter; its outcome in the shape of `requeue_all`'s, so that the API and the command
    line render both the same way."""
    return RequeueOutcome([_requeue(dead_letter_id).id], {})


def _requeue(dead_letter_id: int) -> DeadLetter:
    """Run a dead letter's turn (or test run) again: it goes back to `pending` and is sent to a worker."""
    with transaction() as session:
        row = lock_open_letter(session, dead_letter_id)
        requeued_at = utc_now()
        _reopen(session, row, requeued_at)
        row.requeued_at = requeued_at
    try:
        take_entry(row.queue, row.redis_message_id)
    except redis.RedisError:
        log.warning("could not remove dead letter %s from the broker; the next listing will", row.id)
    _send(row)
    log.info("dead letter %s requeued: %s%s", row.id, row.actor, json.dumps(row.args))
    return row


def requeue_all() -> RequeueOutcome:
    """Requeue every open dead letter that can be; the others are reported with the reason."""
    outcome = RequeueOutcome([], {})
    for view in every_dead_letter():
        try:
            outcome.requeued.append(_requeue(view.row.id).id)
        except (Conflict, NotFound, TooManyActiveConversations) as exc:
            outcome.skipped[view.row.id] = exc.message
    return outcome


__all__ = ["RequeueOutcome", "requeue", "requeue_all", "requeued"]
