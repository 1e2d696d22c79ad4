"""The model calls of a worker that died mid-turn, recorded by the delivery that takes the turn over, or by an
end that no delivery makes (`record_calls_of_dead_deliveries`).

A delivery's calls are recorded with its settlement (`app.attempts`), or on their own when that settlement
is refused; a worker killed before either leaves them in no record, though the provider bills them. What
is left of them is what they streamed to the turn's readers: the live stream holds each call's model and
text, under the dead delivery's attempt numbers. The delivery that takes the turn over from a lease that
was never given up (`ClaimResult.predecessor`) records each such call as `interrupted`, its tokens
estimated (the prompt as a prompt is fitted to a context window, the text streamed, at most the answer's limit) and
priced at its model's prices, before it calls any model itself; and so it does the calls of any earlier delivery
left in no record, since a delivery that took the turn over and was killed before it recorded its own
predecessor's calls would have left those to no one. A turn ended with no delivery (a user's stop, a bound,
its message's death: `app.unheld_ends`) gets no such delivery, so that end records them the same way.

A worker that was only cut off (from the database, for longer than its lease) is alive: when it comes back
its refused settlement records its calls as they were, and replaces these estimates
(`RunAttempts.write_unsettled`). The two take the turn's row first, so whichever commits second sees the
other's rows. A call that had streamed nothing is recorded when it was its delivery's last (the worker died waiting
for its first token, or while it repeated what readers held: `app.live_stream.attempts_streamed`), at its
prompt's estimate. Not recorded: an earlier call
of the delivery that streamed nothing (it failed, perhaps unbilled, before the next began), a call whose stream
Redis lost, and an admin test run's calls (a test run has no live stream).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from app.agent_setup import AgentSetup, setup_in_row
from app.attempts import AttemptRecord, record_interrupted
from app.config import get_settings
from app.db import plain_transaction
from app.failure_kinds import FailureKind
from app.fallback import attempt_order
from app.live_stream import StreamedAttempt, attempts_streamed
from app.model_target import ModelTarget
from app.prompt import ChatMessage, history_before
from app.token_estimates import estimate_answer_tokens, estimate_tokens_of_messages
from app.turn_state import turn_with_its_agent

log = logging.getLogger(__name__)


def record_interrupted_calls(turn_id: int, predecessor: int, recorded_by: str, agent: AgentSetup,
                             prompt_for: Callable[[ModelTarget], list[ChatMessage]], *, fell_back: bool) -> None:
    """Record the calls delivery `predecessor` streamed before its worker stopped, and those of the deliveries
    before it that are in no record (`record_interrupted` passes over a delivery that recorded its own).
    `recorded_by` says who records them, in each record's error; `agent` gives the turn's models, and
    `prompt_for` a model's prompt. Unless the run had switched to its fallback before (`fell_back`), the dead
    deliveries called the models in their order, so a call whose `status` entry was trimmed away is taken for
    the model at its index; after a switch nothing names its model, and it is not recorded. Best effort: a
    failure here is logged and never stops the turn."""
    try:
        targets = attempt_order(agent.primary, agent.fallback, fell_back=False)
        answer_limit, in_order = get_settings().answer_limit(agent.params.max_tokens), not fell_back
        streamed = attempts_streamed(turn_id, up_to=predecessor)
        if streamed is None:
            log.warning("turn %s: Redis unreachable, so the model calls of delivery %s, whose worker stopped "
                        "mid-run, are not recorded", turn_id, predecessor)
            return
        for dead, attempts in streamed.items():
            records = [record for attempt in attempts
                       if (record := _record(attempt, recorded_by, targets, prompt_for, answer_limit,
                                             in_order=in_order)) is not None]
            if records and record_interrupted(turn_id, dead, records):
                log.warning("turn %s: delivery %s stopped mid-run; recorded its interrupted calls: %s", turn_id,
                            dead, ", ".join(f"{r.model_name} ~{r.completion_tokens} tokens" for r in records))
    except Exception:
        log.exception("turn %s: could not record the model calls of delivery %s, whose worker stopped mid-run",
                      turn_id, predecessor)


def _record(attempt: StreamedAttempt, recorded_by: str, targets: Sequence[ModelTarget],
            prompt_for: Callable[[ModelTarget], list[ChatMessage]], answer_limit: int, *,
            in_order: bool) -> AttemptRecord | None:
    """The call's record, or None when nothing names its model."""
    by_name = next((t for t in targets if t.name == attempt.model), None)
    by_index = in_order and attempt.model is None and attempt.index < len(targets)
    target = by_name or (targets[attempt.index] if by_index else None)
    name = attempt.model or (target.name if target is not None else None)
    if name is None:
        return None
    prompt_tokens = estimate_tokens_of_messages(prompt_for(target or targets[0]))
    completion_tokens = estimate_answer_tokens(attempt.own_text, answer_limit, unseen=attempt.own_missing)
    started = attempt.started_ms if attempt.started_ms is not None else attempt.last_ms
    first_text = attempt.first_text_ms
    return AttemptRecord(
        model_name=name, outcome=FailureKind.INTERRUPTED.value,
        error=(f"its worker stopped during the call; recorded by {recorded_by}, from what the call had streamed "
               "(tokens estimated)" if attempt.streamed_text else
               f"its worker stopped before the call streamed text to its readers; recorded by {recorded_by} (the "
               "prompt's tokens estimated)"),
        latency_ms=max(attempt.last_ms - started, 0),
        first_token_ms=max(first_text - started, 0) if first_text is not None else None,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        cost=target.cost(prompt_tokens, completion_tokens) if target is not None else None)


def record_calls_of_dead_deliveries(turn_id: int) -> None:
    """After an end no delivery made (a stop, a bound, a dead message: `app.unheld_ends`) of a turn that was
    processing: record the calls its deliveries that died had streamed, as the delivery taking the turn over
    does (`app.turn_runner`): the turn gets no such delivery, and those calls, which the provider bills, would be
    in no record. Best effort, as that delivery's recording is."""
    try:
        with plain_transaction() as connection:
            row = turn_with_its_agent(connection, turn_id)
            if row is None or row.deliveries == 0:
                return
            history = history_before(connection, row.conversation_id, row.seq)
        agent = setup_in_row(row)
    except Exception:
        log.exception("turn %s: could not read what the model calls of its dead deliveries need to be recorded",
                      turn_id)
        return
    record_interrupted_calls(turn_id, row.deliveries, "the end of the turn that no delivery held", agent,
                             lambda target: agent.prompt_for(target, history, row.content).messages,
                             fell_back=row.fell_back)
