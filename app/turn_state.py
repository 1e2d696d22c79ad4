"""The turn's state machine: the only code that writes a turn's status.

Every change is an UPDATE guarded by the statuses it may leave (`turn_status.sources_for`) and, for
a worker, by the lease token it holds; when the guard matches nothing the change is refused loudly,
so a redelivered message or a worker that lost its lease can never overwrite a finished turn. Who
may claim a run under which lease is `app.claims`'s rule, which an admin test run's state machine
(`app.debug_run_state`) follows too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from functools import cache
from typing import Any, Literal, NamedTuple

from sqlalchemy import Row, bindparam, case, exists, literal, select, update
from sqlalchemy.orm import Session

from app import ledger
from app.agent_setup import AgentSetup, setup_columns, setup_in_row
from app.claims import Claim, ClaimResult, LeaseLost, judge_claim, lease_held
from app.clock import DatabaseNow, lease_time
from app.deliveries import deliveries_at_requeue
from app.in_flight import pending_since_before, processing_past
from app.live_stream import Streamed
from app.models import Agent, Conversation, ConversationMessage, LlmModel, Turn, table
from app.models.base import utc_now
from app.money import quantize
from app.prepared import Batch, Prepared, Unit, then
from app.turn_status import CHARGED, STOPPED, TransitionRefused, TurnStatus, sources_for


class StoppedMeanwhile(RuntimeError):
    """A stop was requested after the worker's last look for one and before the turn's end was written:
    the request was answered 202 and promised `cancelled`, so the turn ends so, whatever end the worker
    had come to (a whole answer, kept as the text generated so far; a failure, its text kept unpaid)."""


@dataclass(frozen=True, slots=True)
class TurnRow:
    """A turn's bookkeeping as its owner read it (plain values, no ORM identity to keep in sync)."""

    assistant_message_id: int
    user_message_id: int
    conversation_id: int
    user_id: int
    deliveries: int
    reserved_amount: Decimal
    cancel_requested_at: datetime | None
    fell_back: bool
    handed_back: int


@dataclass(frozen=True, slots=True)
class TurnInputs:
    """What a turn's run is asked from, read by its claim under the turn's lock."""

    content: str
    """The user's message."""
    seq: int
    """Its place in the conversation: the history is what came before it."""
    agent: AgentSetup
    """The agent's settings and models as they stand at the claim."""


_TURN_COLUMNS = ("assistant_message_id", "user_message_id", "conversation_id", "user_id", "deliveries",
                 "reserved_amount", "cancel_requested_at", "fell_back", "handed_back")


class _Statements(NamedTuple):
    lock_turn: Prepared
    read_turn: Prepared
    unhold: Prepared
    touch_answer: Prepared
    take_lease: Prepared
    give_up_lease: Prepared


@cache
def _statements() -> _Statements:
    """The statements every turn runs, built once on the Core tables and run on the driver (`app.prepared`)."""
    turns, messages, question = table(Turn), table(ConversationMessage), table(ConversationMessage).alias("question")
    conversations, agents = table(Conversation), table(Agent)
    primary, fallback = table(LlmModel).alias("primary_model"), table(LlmModel).alias("fallback_model")
    turn_row = [turns.c[name] for name in _TURN_COLUMNS]
    turn_read = (select(*turn_row, turns.c.lease_token, turns.c.lease_expires_at, turns.c.deadline_at,
                        DatabaseNow().label("now"), messages.c.status,
                        question.c.content, question.c.seq, *setup_columns(agents, primary, fallback))
                 .join_from(turns, messages, messages.c.id == turns.c.assistant_message_id)
                 .join(question, question.c.id == turns.c.user_message_id)
                 .join(conversations, conversations.c.id == turns.c.conversation_id)
                 .join(agents, agents.c.id == conversations.c.agent_id)
                 .join(primary, primary.c.id == agents.c.model_id)
                 .outerjoin(fallback, fallback.c.id == agents.c.fallback_model_id)
                 .where(turns.c.assistant_message_id == bindparam("turn_id")))
    return _Statements(
        lock_turn=Prepared(turn_read.with_for_update(of=[turns, messages])),
        read_turn=Prepared(turn_read),
        unhold=Prepared(update(turns).where(turns.c.assistant_message_id == bindparam("turn_id"))
                        .values(reserved_amount=turns.c.reserved_amount - bindparam("hold"))),
        touch_answer=Prepared(update(messages).where(messages.c.id == bindparam("turn_id"))
                              .values(updated_at=bindparam("at"))),
        take_lease=Prepared(update(turns).where(turns.c.assistant_message_id == bindparam("turn_id"))
                            .values(lease_token=bindparam("token"), lease_expires_at=bindparam("expires"),
                                    deadline_at=bindparam("deadline"), deliveries=turns.c.deliveries + 1,
                                    reserved_amount=turns.c.reserved_amount + bindparam("hold"),
                                    updated_at=bindparam("at"))),
        give_up_lease=Prepared(update(turns)
                               .where(turns.c.assistant_message_id == bindparam("turn_id"),
                                      turns.c.lease_token == bindparam("token"))
                               .values(lease_token=None, lease_expires_at=None, cost_estimated=bindparam("estimated"),
                                       reserved_amount=0, updated_at=bindparam("at"))
                               .returning(turns.c.cancel_requested_at)),
    )


_ANSWER_COLUMNS = ("content", "model", "prompt_tokens", "completion_tokens", "total_tokens", "cost", "latency_ms")


Written = Literal["status", "error", "answer"]
"""What a move of a turn's messages writes besides their status and stamp: nothing ("status"), their error
message ("error"), or that and the answer's columns on the assistant's row ("answer")."""


@cache
def _status_update(target: TurnStatus, written: Written) -> Prepared:
    """Both messages of a turn to `target` in one UPDATE guarded by the statuses `target` may be reached from."""
    messages = table(ConversationMessage)
    values: dict[str, Any] = {"status": target.value, "updated_at": bindparam("at")}
    if written != "status":
        values["error_message"] = bindparam("error")
    if written == "answer":
        values.update({name: case((messages.c.id == bindparam("answer"),
                                   bindparam(f"a_{name}", type_=messages.c[name].type)), else_=messages.c[name])
                       for name in _ANSWER_COLUMNS})
    return Prepared(update(messages)
                    .where(messages.c.id.in_([bindparam("question"), bindparam("answer")]),
                           messages.c.status.in_([literal(source) for source in sources_for(target)]))
                    .values(**values))


def _move_messages(unit: Unit | Batch, target: TurnStatus, question: int, answer: int, written: Written = "status",
                   **values: Any) -> None:
    """Run `_status_update`; a turn whose messages were not both in a status `target` is reached from is refused."""
    moved = _status_update(target, written)(unit, {"question": question, "answer": answer, **values})

    def check() -> None:
        if moved.rowcount != 2:
            raise TransitionRefused(f"turn {answer} cannot move to {target.value}")

    then(unit, check)


def turn_with_its_agent(unit: Unit, turn_id: int) -> Row[Any] | None:
    """The turn's row as a claim reads it (the turn, its question, its agent and models), without its lock: for
    the calls of a delivery that died to be recorded after an end that no delivery made
    (`app.interrupted_calls`), when the turn has ended."""
    return _statements().read_turn(unit, {"turn_id": turn_id}).first()


def claim_turn(session: Unit, turn_id: int, lease_seconds: float,
               hold: Callable[[ClaimResult], Decimal] | None = None) -> ClaimResult:
    """Take a pending turn, or take over a processing one whose lease ran out (its worker died).

    The turn and its answer are locked for the decision, so two workers given the same message agree
    on one owner. Both rows are locked, not just the turn: a row read through a join but not locked
    would come from the snapshot taken before the wait, so a worker that waited for another's final
    commit would see the lease given up but the status still `processing`, and run the turn again.
    The delivery's deadline (`delivery_deadline`: a taken-over turn keeps its first delivery's) is written
    with the lease, for recovery to find; the claim says how much model time it leaves (`time_left`).

    Two round trips and the commit: the lock, which reads the run's inputs with it, and one batch of
    writes. `hold(claim)` says, from those inputs, how much of the user's balance to reserve (the
    caller's rule; zero for nothing), which goes out in that batch with the status and the lease; it
    may read more on the way (the runner reads a later turn's history: one round trip more). A
    reservation the balance cannot cover is taken back in the same transaction and reported as not
    `affordable` (one round trip more, on that rare path only).
    """
    sql = _statements()
    row = sql.lock_turn(session, {"turn_id": turn_id}).first()
    if row is None:
        return ClaimResult(Claim.MISSING)
    decision = judge_claim(row.status, row.lease_token, row.lease_expires_at, row.deadline_at, row.now,
                           timeout_seconds=row.timeout_seconds, has_fallback=row.fallback_model_id is not None,
                           lease_seconds=lease_seconds)
    outcome, deadline = decision.outcome, decision.deadline
    if deadline is None:
        return ClaimResult(outcome)
    turn = TurnRow(row.assistant_message_id, row.user_message_id, row.conversation_id, row.user_id,
                   row.deliveries + 1, row.reserved_amount, row.cancel_requested_at, row.fell_back, row.handed_back)
    inputs = TurnInputs(row.content, row.seq, setup_in_row(row))
    claim = ClaimResult(outcome, turn, decision.token, turn.deliveries, inputs, handed_back=row.handed_back,
                        time_left=deadline.time_left,
                        predecessor=row.deliveries if outcome is Claim.TAKEN_OVER and row.lease_token else None)
    amount = max(quantize(hold(claim)), Decimal(0)) if hold is not None else Decimal(0)
    written_at = utc_now()
    with Batch(session) as batch:
        if outcome is Claim.TAKEN_OVER:
            sql.touch_answer(batch, {"turn_id": turn_id, "at": written_at})
        else:
            _move_messages(batch, TurnStatus.PROCESSING, row.user_message_id, turn_id, at=written_at)
        sql.take_lease(batch, {"turn_id": turn_id, "token": claim.token, "expires": decision.lease_expires_at,
                               "deadline": deadline.at,
                               "hold": amount, "at": written_at})
        reserved = ledger.reserve(batch, row.user_id, amount) if amount > 0 else None
    if reserved is None:
        return claim
    if reserved.rowcount != 1:
        sql.unhold(session, {"turn_id": turn_id, "hold": amount})
        return replace(claim, affordable=False)
    return replace(claim, turn=replace(turn, reserved_amount=turn.reserved_amount + amount))


def _move_with_error(session: Session, turn: Turn, target: TurnStatus, error_message: str | None) -> None:
    """Both messages to `target` with this error message (or none), guarded by the statuses they may leave."""
    _move_messages(session, target, turn.user_message_id, turn.assistant_message_id, "error",
                   error=error_message, at=utc_now())


def finish_turn(
    unit: Unit | Batch,
    turn_id: int,
    question_id: int,
    token: str,
    target: TurnStatus,
    *,
    content: str = "",
    model: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    cost: Decimal | None = None,
    cost_estimated: bool = False,
    latency_ms: int | None = None,
    error_message: str | None = None,
    at: datetime | None = None,
) -> None:
    """Move a turn this worker owns to a terminal status and store what it produced, stamped `at` (now by
    default; a settlement passes its own stamp, by which `RunKind.ended_with` knows its commit).

    The lease is given up by the same guarded UPDATE that proves this worker still holds it: on a
    batch, the messages' UPDATE goes out with it, and a lost lease raises `LeaseLost` once the
    results are in, which rolls both back; so does a stop requested meanwhile, for any end but
    `cancelled` (`StoppedMeanwhile`: the same UPDATE reads it, after the stop's own write if they raced). That
    UPDATE also empties the turn's reservation, which the caller charges or releases in the same
    transaction: an ended turn holds nothing, so a requeued one reserves again instead of inheriting an
    amount already given back (and giving it back twice).
    """
    if not target.is_terminal:
        raise ValueError(f"{target} is not terminal")
    now = at or utc_now()
    lease = _statements().give_up_lease(unit, {"turn_id": turn_id, "token": token, "estimated": cost_estimated,
                                               "at": now})

    def held() -> None:
        given_up = lease.first()  # the row, not the rowcount: SQLite counts none for an UPDATE ... RETURNING
        if given_up is None:
            raise LeaseLost(f"turn {turn_id} is owned by another worker")
        if target is not TurnStatus.CANCELLED and given_up.cancel_requested_at is not None:
            raise StoppedMeanwhile(f"turn {turn_id} was asked to stop before its end ({target.value}) was written")

    then(unit, held)
    _move_messages(unit, target, question_id, turn_id, "answer", error=error_message, at=now,
                   **_answer_values(content, model, prompt_tokens, completion_tokens, cost, latency_ms))


def _answer_values(content: str, model: str | None, prompt_tokens: int | None, completion_tokens: int | None,
                   cost: Decimal | None, latency_ms: int | None) -> dict[str, Any]:
    """The answer's columns as `_status_update` binds them; its tokens all null when neither count is given."""
    counted = prompt_tokens is not None or completion_tokens is not None
    return {"a_content": content, "a_model": model,
            "a_prompt_tokens": (prompt_tokens or 0) if counted else None,
            "a_completion_tokens": (completion_tokens or 0) if counted else None,
            "a_total_tokens": (prompt_tokens or 0) + (completion_tokens or 0) if counted else None,
            "a_cost": cost, "a_latency_ms": latency_ms}


def end_turn_unowned(session: Session, turn_id: int, target: TurnStatus, error_message: str, *,
                     pending_before: datetime | None = None, deadline_before: datetime | None = None,
                     kept: Streamed | None = None) -> tuple[Turn, TurnStatus] | None:
    """End an in-flight turn without holding its lease: retries exhausted, or cancelled before a worker.

    Whatever a worker had reserved for it is given back here, as a settlement would (`finish_turn`),
    so an ended turn holds nothing. A turn under a live lease is left alone: another delivery (of a
    duplicate message) is running it and settles it itself, and if that one dies too the lease runs out
    and recovery takes over. A stop its user asked for wins over any other end, as it does over a
    worker's (`finish_turn`): the user was told it would end `cancelled`. Returns the turn and the status
    it ended with, or None when it was not ended here. The turn keeps `kept`, the text its dead delivery
    streamed to readers, unpaid, as a worker's end does (`app.turn_runner`): their deltas concatenate to the
    content, and a stop's end is the contract's "keeps the text generated so far".

    With `pending_before`, only a turn still `pending` since before that moment is ended, judged under the
    turn's lock (which a claim takes too): the sweep that found it waiting too long read it earlier, and a
    worker may have claimed it since, even handed it to a retry, leaving no lease to protect it. With
    `deadline_before`, only a turn still `processing` with its deadline before that moment is ended, judged the
    same way (`app.deadline_bound`): a requeue since makes it pending again, with a new deadline to come.
    """
    locked = session.execute(
        select(Turn, DatabaseNow()).where(Turn.assistant_message_id == turn_id).with_for_update()
    ).first()
    if locked is None:
        return None
    turn, now = locked
    if lease_held(turn.lease_token, turn.lease_expires_at, lease_time(now)):
        return None
    if pending_before is not None and not session.scalar(select(exists().where(
            ConversationMessage.id == turn_id,
            pending_since_before(ConversationMessage.status, ConversationMessage.updated_at, pending_before)))):
        return None
    if deadline_before is not None and not session.scalar(select(exists().where(
            Turn.assistant_message_id == turn_id, ConversationMessage.id == Turn.assistant_message_id,
            processing_past(ConversationMessage.status, Turn.deadline_at, deadline_before)))):
        return None
    if turn.cancel_requested_at is not None:
        target, error_message = TurnStatus.CANCELLED, STOPPED
    try:
        if kept is not None:
            # A stop's end is charged nothing (zero); an error's is not charged at all (none).
            tokens, cost = (0, Decimal(0)) if target in CHARGED else (None, None)
            _move_messages(session, target, turn.user_message_id, turn_id, "answer", error=error_message,
                           at=utc_now(), **_answer_values(kept.text, kept.model, tokens, tokens, cost, None))
        else:
            _move_with_error(session, turn, target, error_message)
    except TransitionRefused:
        return None
    turn.lease_token = None
    turn.lease_expires_at = None
    ledger.release(session, turn.user_id, turn.reserved_amount)  # no delivery generated what it keeps: unpaid
    turn.reserved_amount = Decimal(0)
    return turn, target


@dataclass(frozen=True, slots=True)
class StopRecorded:
    status: TurnStatus
    """The status the turn was in: a pending one is the caller's to end now."""
    held: bool
    """Whether a delivery holds the turn (a live lease), which ends it `cancelled` itself; one no delivery holds
    (its worker died, its lease ran out; or a failed delivery handed it to a retry) is the caller's to end
    now too (`app.cancellation`): no worker may take it for minutes, or ever with none running."""


def request_stop(session: Session, turn_id: int) -> StopRecorded | None:
    """Record a user's stop of an in-flight turn, under the turn's lock: the mark a worker's settlement and an
    end without the lease both read (`finish_turn`, `end_turn_unowned`), so that the turn ends `cancelled`
    whoever ends it. None when it had already ended, which a stop leaves as it is."""
    turn, now = session.execute(
        select(Turn, DatabaseNow()).where(Turn.assistant_message_id == turn_id).with_for_update()).one()
    # Read after the lock, in a statement of its own: read with the lock, it would be the status from before
    # a settlement this stop waited for.
    status = TurnStatus(session.scalars(select(ConversationMessage.status)
                                        .where(ConversationMessage.id == turn_id)).one())
    if status.is_terminal:
        return None
    turn.cancel_requested_at = utc_now()
    return StopRecorded(status, lease_held(turn.lease_token, turn.lease_expires_at, lease_time(now)))


def refuse_unless_reopenable(session: Session, turn: Turn) -> None:
    """`TransitionRefused` unless the turn's answer may move back to `pending` (it ended `error`): asked before a
    requeue's other checks, so that a run no longer in error is refused as that, whatever else would refuse it.
    `reopen_turn` asks again under the turn's lock."""
    status = session.get_one(ConversationMessage, turn.assistant_message_id).status
    if status not in sources_for(TurnStatus.PENDING):
        raise TransitionRefused(f"turn {turn.assistant_message_id} cannot move to pending")


def reopen_turn(session: Session, turn_id: int, enqueued_at: datetime) -> Turn:
    """An operator's requeue of a turn that ended as `error`: it becomes pending again, its delivery
    count at the start of the next thousand (`deliveries_at_requeue`), its outbox mark `enqueued_at`."""
    turn = session.execute(
        select(Turn).where(Turn.assistant_message_id == turn_id).with_for_update()
        .execution_options(populate_existing=True)  # the caller may have read the row before its lock
    ).scalar_one_or_none()
    if turn is None:
        raise TransitionRefused(f"turn {turn_id} does not exist")
    # The answer starts over too: an end that kept what its readers were sent would show it while pending again.
    _move_messages(session, TurnStatus.PENDING, turn.user_message_id, turn_id, "answer", error=None, at=utc_now(),
                   **_answer_values("", None, None, None, None, None))
    turn.cancel_requested_at = None  # the operator's requeue is a new start: no earlier stop carries over
    turn.fell_back = False  # nor an earlier switch to the fallback
    turn.handed_back = 0  # the delivery count's give-up rule starts over (`deliveries_at_requeue`)
    turn.lease_token = None
    turn.lease_expires_at = None
    turn.enqueued_at = enqueued_at
    turn.deliveries = deliveries_at_requeue(turn.deliveries)
    return turn
