"""Running one turn in a worker: claim (and reserve), moderate, call the model (with fallback), settle.

The actor calls `run_turn` with the assistant message id. Delivery is at least once, so a run that
finds the turn finished, or owned by a live worker, returns without calling any model; and the final
transaction (status, answer, statistics, charge, attempt records) is guarded by the lease, so a
worker that lost its turn to another cannot write anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from functools import partial

from app import conversation_locks, ledger, metrics
from app.agent_setup import AgentSetup
from app.attempts import settling
from app.claims import ClaimResult, LeaseLost
from app.config import get_settings
from app.conversations import record_turn_end
from app.db import plain_transaction
from app.deliveries import RunGivenUp, attempts_end_by, first_delivery_since_requeue, give_up_reason
from app.fallback import attempt_order
from app.interrupted_calls import record_interrupted_calls
from app.leases import Holding, keeper
from app.live_stream import Streamed, text_streamed
from app.live_stream_writer import TurnStream
from app.model_calls import Outcome, call_with_fallback
from app.model_target import ModelTarget
from app.moderation import moderate
from app.prepared import Batch, Unit
from app.prompt import ChatMessage, history_before
from app.run_kinds import TURN
from app.turn_state import StoppedMeanwhile, TurnRow, claim_turn, finish_turn
from app.turn_status import CHARGED, STOPPED, TurnStatus

log = logging.getLogger(__name__)


UNAFFORDABLE = "the available balance does not cover the largest possible cost of this turn"


@dataclass(frozen=True, slots=True)
class TurnContext:
    turn_id: int
    question_id: int
    token: str
    user_id: int
    conversation_id: int
    content: str
    history: list[ChatMessage]
    agent: AgentSetup
    reserved: Decimal
    delivery: int
    """This delivery's number (`deliveries` at its claim), which names its stream's attempts and records."""
    fell_back: bool
    """An earlier delivery switched the run to its fallback (`Turn.fell_back`): this one calls the fallback alone."""
    gives_up: str | None
    """Why this delivery ends the turn as `error` without a model call (`app.deliveries.give_up_reason`)."""
    ends_by: float | None
    """When the delivery's model time before its turn's deadline ends, on `time.monotonic()`, counted from
    the claim (`app.deliveries.Deadline`)."""

    @property
    def held(self) -> conversation_locks.HeldTurn:
        return conversation_locks.HeldTurn(self.turn_id, self.user_id, self.conversation_id)

    def prompt_for(self, target: ModelTarget) -> list[ChatMessage]:
        return self.agent.prompt_for(target, self.history, self.content).messages


def _load_context(unit: Unit, claim: ClaimResult) -> TurnContext:
    """Everything the run needs: what the claim read under its lock, and the history (none on a first turn)."""
    turn, inputs = claim.turn, claim.inputs
    assert turn is not None and inputs is not None and claim.token is not None
    return TurnContext(
        turn_id=turn.assistant_message_id, question_id=turn.user_message_id, token=claim.token,
        user_id=turn.user_id, conversation_id=turn.conversation_id, content=inputs.content,
        history=history_before(unit, turn.conversation_id, inputs.seq),
        agent=inputs.agent, reserved=turn.reserved_amount, delivery=claim.deliveries, fell_back=turn.fell_back,
        gives_up=give_up_reason(claim.deliveries, claim.time_left, claim.handed_back),
        ends_by=attempts_end_by(claim.time_left),
    )


def run_turn(turn_id: int) -> None:
    with TURN.log_context(turn_id):
        _run_turn(turn_id)


def _run_turn(turn_id: int) -> None:
    settings = get_settings()
    loaded: TurnContext | None = None
    with plain_transaction() as connection:

        def read_and_price(claim: ClaimResult) -> Decimal:
            """Called by the claim once it holds the turn: the context is read under its lock, and priced."""
            nonlocal loaded
            loaded = _load_context(connection, claim)
            assert claim.turn is not None
            return _worst_case(loaded, claim.turn)

        claim = claim_turn(connection, turn_id, settings.lease_seconds, hold=read_and_price)
    if not claim.acquired:
        log.info("turn %s not run: %s", turn_id, claim.outcome.value)
        return
    assert claim.turn is not None and loaded is not None
    context = replace(loaded, reserved=claim.turn.reserved_amount)  # the claim reserved after the context was read
    cancel_requested = claim.turn.cancel_requested_at is not None
    log.info("turn %s %s (delivery %s)", turn_id, claim.outcome.value, context.delivery)
    if claim.predecessor is not None:
        record_interrupted_calls(turn_id, claim.predecessor, f"delivery {context.delivery}, which took the turn over",
                                 context.agent, context.prompt_for, fell_back=context.fell_back)
    since = first_delivery_since_requeue(context.delivery)  # a requeue starts anew: none of the earlier text
    stream = TurnStream(turn_id, context.delivery,
                        text_streamed(turn_id, since=since) if context.delivery > since else None)
    if context.gives_up or not claim.affordable:
        _end_without_model_call(context, stream)
        return
    stop = threading.Event()
    if cancel_requested:
        stop.set()
    with keeper.running(Holding(turn_id, context.token, stop, context.held, delivery=context.delivery)) as holding:
        _execute(context, holding, stream)
    if not holding.lost:
        conversation_locks.release(context.held)


def _end_without_model_call(context: TurnContext, stream: TurnStream) -> None:
    """A turn whose deliveries are spent (`gives_up`) ends `error`, one whose user cannot afford its worst case
    `insufficient_balance`, its model never called. A given-up turn's message then dies (`RunGivenUp`), so that
    its dead letter shows why."""
    status, reason = ((TurnStatus.ERROR, context.gives_up) if context.gives_up
                      else (TurnStatus.INSUFFICIENT_BALANCE, UNAFFORDABLE))
    try:
        ended = _settle_failure(context, status, reason, stream)
    except LeaseLost:
        # No keeper renews the lease of an end written without a model call: one given up carries the
        # passed deadline, which a sweep may revoke first, and any waits out a database outage that
        # may outlast the lease. The delivery that took the turn over ends it the same way.
        log.info("turn %s was taken over before it could end %s; that delivery ends it", context.turn_id,
                 status.value)
        return
    conversation_locks.release(context.held)
    if context.gives_up and ended is TurnStatus.ERROR:
        raise RunGivenUp(context.gives_up)


def _execute(context: TurnContext, holding: Holding, stream: TurnStream) -> None:
    """Whatever ends the turn (a stop before the call, moderation's refusal, the model calls' outcome), the
    run is marked `ending` before its end is written: a hand-back at shutdown then leaves it to finish (handed
    back, an answer would be paid twice, a refused input moderated again, which fails open)."""
    settle, stopped = _end_of(context, holding.stop, stream)
    keeper.ending(holding, stopped=stopped)
    settle()


def _end_of(context: TurnContext, stop: threading.Event, stream: TurnStream) -> tuple[Callable[[], object], bool]:
    """Run the turn up to its end, and return the settlement that writes it, and whether that end is a stop (or
    the run was found no longer this delivery's, which the stop of a hand-back may follow)."""
    started = time.monotonic()
    if stop.is_set():
        return partial(_settle_cancelled, context, Outcome(cancelled=True), 0, stream), True
    agent = context.agent
    verdict = moderate(context.content)
    if not verdict.passed:
        return partial(_settle_failure, context, TurnStatus.CONTENT_VIOLATION, verdict.error_message, stream), False
    outcome = call_with_fallback(agent.primary, agent.fallback, context.prompt_for, agent.params, stream, stop,
                                 ends_by=context.ends_by, fell_back=context.fell_back,
                                 before_fallback_call=lambda: TURN.mark_fell_back(
                                     context.turn_id, context.token, ends_by=context.ends_by, stop=stop))
    elapsed_ms = int((time.monotonic() - started) * 1000)
    if outcome.completion is not None:
        return partial(_settle_success, context, outcome, elapsed_ms, stream), False
    if outcome.cancelled:
        return partial(_settle_cancelled, context, outcome, elapsed_ms, stream), outcome.cut_short
    return partial(_settle_failure, context, TurnStatus.LLM_ERROR, outcome.error_message, stream, outcome, elapsed_ms,
                   content=outcome.partial, model=outcome.model), outcome.cut_short


def _streamed_by(context: TurnContext, held: Streamed) -> str:
    """The name of the model that streamed the text readers hold of an earlier call, as its `status` entry
    announced it: an admin may have changed the agent's models, or renamed that one, since; the one this
    delivery calls first when the stream no longer names it (the entry trimmed away): the fallback for a run that
    switched to it in an earlier delivery (`Turn.fell_back`)."""
    first = attempt_order(context.agent.primary, context.agent.fallback, fell_back=context.fell_back)[0]
    return held.model or first.name


def _worst_case(context: TurnContext, turn: TurnRow) -> Decimal:
    """What the claim holds of the user's balance: the worst case (the prompt at its bytes plus the answer's
    token limit, at the dearest model's prices: `app.agent_models.max_cost`), for a delivery that will call a model.

    A turn taken over from a dead worker keeps the reservation that worker made and holds only what the
    worst case has grown by since: it runs with the agent and models as they are now (an admin may have
    raised a price or `max_tokens` meanwhile), and a reservation priced under the old ones let it run an
    answer its user could not cover. Nothing for one given up (too many deliveries, no time left) or
    cancelled before it started."""
    if context.gives_up or turn.cancel_requested_at:
        return Decimal(0)
    return max(context.agent.worst_case_cost(context.history, context.content) - turn.reserved_amount, Decimal(0))


@dataclass(frozen=True, slots=True)
class _Answer:
    """What a turn's end stores on its answer besides its model and cost (`finish_turn`'s other columns)."""

    content: str = ""
    error_message: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_estimated: bool = False
    latency_ms: int | None = None


def _settle(context: TurnContext, target: TurnStatus, stream: TurnStream, answer: _Answer, *,
            model: str | None = None, cost: Decimal | None = None, success_tokens: int | None = None,
            outcome: Outcome | None = None) -> TurnStatus:
    """End the turn in one batch: both messages and the answer, the statistics, the money, the attempts
    (written on their own if the batch fails: `app.attempts.settling`). A database outage is waited out
    rather than raised (the lease keeper renews the lease once the database is back): the model calls are
    paid for, and the retry of a raised delivery would make them again.

    A turn with a `cost` is charged it (zero writes no ledger row); one without has its reservation
    released. Only the statuses the contract charges (`CHARGED`) may carry a cost.

    Its content is what its readers were sent (`TurnStream.readers_text`), whatever the end: their deltas
    concatenate to it, as the contract says; the `content` given, the caller's own text, when they hold none.

    A stop asked for before this end was written (`StoppedMeanwhile`) ends the turn `cancelled` instead, as
    the stop's 202 promised, with the same text and cost: a whole answer is paid for (every token of it was
    generated), a failure's text stays unpaid, and neither counts in the conversation's tokens. Returns the
    status written."""
    if cost is not None and target not in CHARGED:
        raise ValueError(f"a turn that ends {target.value} is not charged")
    if (kept := stream.readers_text()) is not None:
        answer = replace(answer, content=kept.text)
    try:
        with settling(outcome.attempts if outcome else (), delivery=context.delivery, message_id=context.turn_id,
                      settled_again_after=(StoppedMeanwhile,)) as attempts:

            def write() -> None:
                with plain_transaction() as connection, Batch(connection) as batch:
                    finish_turn(batch, context.turn_id, context.question_id, context.token, target,
                                model=model, cost=cost, at=attempts.at, content=answer.content,
                                error_message=answer.error_message, prompt_tokens=answer.prompt_tokens,
                                completion_tokens=answer.completion_tokens, cost_estimated=answer.cost_estimated,
                                latency_ms=answer.latency_ms)
                    record_turn_end(batch, context.conversation_id, success_tokens)
                    ledger.settle_turn(batch, context.user_id, context.turn_id, cost, context.reserved)
                    attempts.write(batch)

            TURN.write_end(context.turn_id, attempts.at, write, what=f"settling turn {context.turn_id}")
    except StoppedMeanwhile:  # no success_tokens: a stopped turn's tokens are not the conversation's
        if cost is None and stream.held_by_readers() is not None:
            # An unpaid end with no text of its own (a delivery given up, out of time or deliveries, before any
            # call) keeps what readers hold of an earlier delivery's call, as any stop does.
            return _settle_cancelled(context, outcome or Outcome(cancelled=True), answer.latency_ms, stream)
        return _settle(context, TurnStatus.CANCELLED, stream, replace(answer, error_message=STOPPED), model=model,
                       cost=cost, outcome=outcome)
    metrics.observe_cost("turn", cost)
    stream.finished(target, model, answer.content)
    log.info("turn %s ended %s: %s, cost %s%s", context.turn_id, target.value,
             f"model {model}" if model else "no model answered", cost if cost is not None else 0,
             f"; {answer.error_message}" if answer.error_message else "")
    return target


def _settle_success(context: TurnContext, outcome: Outcome, elapsed_ms: int, stream: TurnStream) -> None:
    """A whole answer is a success (or `cancelled`, paid for, when a stop landed before it was written)."""
    completion, model, cost = outcome.completion, outcome.model, outcome.answer_cost
    assert completion is not None and model is not None
    usage = completion.usage
    _settle(context, TurnStatus.SUCCESS, stream,
            _Answer(completion.text, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                    cost_estimated=not usage.reported, latency_ms=elapsed_ms),
            model=model.name, cost=cost, outcome=outcome, success_tokens=usage.prompt_tokens + usage.completion_tokens)


def _settle_cancelled(context: TurnContext, outcome: Outcome, elapsed_ms: int | None,
                      stream: TurnStream) -> TurnStatus:
    """A stopped turn keeps the text its readers were sent (`TurnStream.readers_text`) and pays for the tokens
    its stopped call generated (estimated, marked so, and at most the `max_tokens` the request was sent with, as
    a whole answer's usage is: the estimate counts a token a character outside ASCII, more than a model makes of
    such text); nothing for text that came from a failed attempt, which is never charged; one stopped before any
    text names no model. A stop while this delivery had not yet gone past what readers hold of an earlier call
    (`TurnStream.held_by_readers`: it was repeating that text, or had called no model yet) keeps that text,
    unpaid (a call that died with its worker is recorded as `interrupted`, not charged), named as the model its
    readers were told wrote it."""
    held, model = stream.held_by_readers(), outcome.model
    name, paid = model.name if model else None, outcome.stopped_call
    if held is not None:  # this delivery's call is still repeating what readers hold, or was never made
        name, paid = _streamed_by(context, held), None
    answer = _Answer(outcome.partial, STOPPED, prompt_tokens=paid.prompt_tokens if paid else 0,
                     completion_tokens=paid.completion_tokens if paid else 0, cost_estimated=True,
                     latency_ms=elapsed_ms)
    return _settle(context, TurnStatus.CANCELLED, stream, answer, model=name, cost=paid.cost if paid else Decimal(0),
                   outcome=outcome)


def _settle_failure(context: TurnContext, status: TurnStatus, reason: str, stream: TurnStream,
                    outcome: Outcome | None = None, elapsed_ms: int | None = None, content: str = "",
                    model: ModelTarget | None = None) -> TurnStatus:
    """A turn that ends without an answer keeps what its readers were sent (`_settle`), named as the model they
    were told wrote it; `content` and `model`, the text its last attempt streamed before it failed and that
    attempt's model, when they were sent nothing. Returns the status written: `cancelled` where a stop came
    first."""
    kept = stream.readers_text()
    name = _streamed_by(context, kept) if kept is not None else model.name if model else None
    return _settle(context, status, stream, _Answer(content, reason, latency_ms=elapsed_ms), model=name,
                   outcome=outcome)


__all__ = ["run_turn"]
