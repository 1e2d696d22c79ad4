"""A run's model calls: each model in the fallback policy's order (`app.fallback`) until one answers, every
attempt recorded as it ends. Every attempt is returned as a record, failed ones included, so operators see
providers' failure rates and costs; a failed attempt is never charged. What an attempt streamed stays with the
turn's readers, who never take text back: a turn stores all they were sent
(`app.live_stream_writer.TurnStream`), the fallback's answer after a failed attempt's text (unless it repeats
that text, when it goes on from its end). `Outcome.partial` is the last attempt's text, an admin test run's
output when no attempt answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from app import metrics
from app.agent_setup import AgentParams
from app.answer_sink import AnswerSink
from app.attempts import AttemptRecord
from app.config import get_settings
from app.fallback import attempt_order, attempt_seconds, switches_after
from app.llm_client import AttemptFailed, Completion, stream_chat
from app.model_target import ModelTarget
from app.token_estimates import estimate_answer_tokens, estimate_tokens_of_messages

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What the attempts produced: an answer from `model`, a cancellation, or the reasons of every failure."""

    completion: Completion | None = None
    model: ModelTarget | None = None
    """The model that answered, or, for a stop or a failure after text was streamed, the one whose text is
    kept: none when nothing was (the contract's `model` names the model that produced the answer)."""
    cancelled: bool = False
    partial: str = ""
    """The text of the last attempt that did not finish (failed or stopped): an admin test run's output when no
    attempt answered (a turn stores what its readers were sent: `app.live_stream_writer.TurnStream`)."""
    disowned: bool = False
    """The fallback was not called because the run was no longer this delivery's (taken over, or handed back by
    a stopping worker): its end is not this delivery's to write."""
    stopped_call: AttemptRecord | None = None
    """The record of the call a stop cut short, when its text is the one kept: its estimate (the prompt, and
    the text streamed at most `max_tokens`) is what a stopped turn is charged, so the charge and the attempt's
    record are one figure."""
    attempts: list[AttemptRecord] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    """Each target's failure as a user may read it, and in full, with what its endpoint said
    (`AttemptFailed.said`): the latter for an admin's test run, never a user's turn."""

    @property
    def cut_short(self) -> bool:
        """The calls did not end by themselves: a stop, or a fallback not called because the run was given up. Such
        an end is no reason for a run handed back at shutdown to take its lease back (`LeaseKeeper.ending`)."""
        return self.cancelled or self.disowned

    @property
    def answer_cost(self) -> Decimal | None:
        """The answer at the prices of the model that gave it (the fallback's, when it answered): one figure for
        what a turn is charged and what a test run logs. None without an answer."""
        if self.completion is None or self.model is None:
            return None
        usage = self.completion.usage
        return self.model.cost(usage.prompt_tokens, usage.completion_tokens)

    def note(self, error: str, in_full: str | None = None) -> None:
        self.failures.append((error, in_full or error))

    @property
    def error_message(self) -> str:
        return "; ".join(error for error, _ in self.failures)

    @property
    def error_message_in_full(self) -> str:
        return "; ".join(in_full for _, in_full in self.failures)


def _record(target: ModelTarget, outcome: str, error: str | None, latency_ms: int, first_token_ms: int | None,
            prompt_tokens: int | None, completion_tokens: int | None) -> AttemptRecord:
    cost = None
    if prompt_tokens is not None and completion_tokens is not None:
        cost = target.cost(prompt_tokens, completion_tokens)
    return AttemptRecord(target.name, outcome, error, latency_ms, first_token_ms, prompt_tokens,
                         completion_tokens, cost)


def _record_failure(outcome: Outcome, target: ModelTarget, failure: AttemptFailed, messages: list[dict[str, str]],
                    max_tokens: int) -> None:
    """A failed attempt's record, estimated (no usage report came): its prompt, when the provider may bill a
    request it got, and the text it streamed; its text is the outcome's, and names its model, if any came."""
    prompt_estimate = estimate_tokens_of_messages(messages) if failure.may_be_billed else 0
    produced = estimate_answer_tokens(failure.partial, max_tokens)
    outcome.attempts.append(_record(target, failure.kind.value, failure.detail_in_full, failure.latency_ms,
                                    failure.first_token_ms, prompt_estimate, produced))
    outcome.note(f"{target.name}: {failure}", f"{target.name}: {failure.in_full}")
    outcome.partial = failure.partial
    outcome.model = target if failure.partial else None


def call_with_fallback(
    primary: ModelTarget,
    fallback: ModelTarget | None,
    prompt_for: Callable[[ModelTarget], list[dict[str, str]]],
    params: AgentParams,
    sink: AnswerSink,
    stop: threading.Event,
    *,
    ends_by: float | None = None,
    fell_back: bool = False,
    before_fallback_call: Callable[[], bool] | None = None,
) -> Outcome:
    """Each model in turn (`attempt_order`) until one answers or a failure does not allow the next; only the
    fallback for a run that switched to it in an earlier delivery (`fell_back`). `before_fallback_call` is told
    before the fallback is called after the primary failed, so that the run remembers the switch; False
    from it (the run is no longer this delivery's) ends the attempts there.

    Each attempt is bounded by the agent's timeout and by what is left of the delivery's model time before
    its run's deadline (`ends_by`, on `time.monotonic()`, from `app.deliveries.attempts_end_by`; None: no
    deadline): an attempt with nothing left is not made."""
    outcome = Outcome()
    targets = attempt_order(primary, fallback, fell_back=fell_back)
    for index, target in enumerate(targets):
        if stop.is_set():
            # A stop before this target's call: before the first, nothing was streamed; before the fallback's
            # (reached only after the primary failed), the primary's failed text is kept, as its own and unpaid.
            outcome.cancelled = True
            outcome.note(f"{target.name}: cancelled before the call")
            return outcome
        timeout = attempt_seconds(params.timeout_seconds, ends_by, time.monotonic())
        if timeout <= 0:
            outcome.note(f"{target.name}: not called, no time left before the run's deadline")
            return outcome
        sink.attempt_started(target.name, restart=index > 0)
        messages = prompt_for(target)
        max_tokens = get_settings().answer_limit(params.max_tokens)
        try:
            completion = stream_chat(target, messages, timeout_seconds=timeout,
                                     temperature=params.temperature, max_tokens=max_tokens,
                                     on_delta=sink.delta, stop=stop)
        except AttemptFailed as failure:
            _record_failure(outcome, target, failure, messages, max_tokens)
            if not switches_after(failure.kind):  # a stop: the run's calls end there, cancelled
                outcome.cancelled = True
                outcome.stopped_call = outcome.attempts[-1] if failure.partial else None
                return outcome
            following = targets[index + 1] if index + 1 < len(targets) else None
            log.warning("model %s failed after %s ms (%s)%s", target.name, failure.latency_ms, failure.in_full,
                        f"; falling back to {following.name}" if following else "")
            if following is None:
                return outcome
            if before_fallback_call is not None and not before_fallback_call():
                outcome.note(f"{following.name}: not called, the run is no longer this delivery's")
                outcome.disowned = True
                return outcome
            metrics.observe_fallback()
            continue
        outcome.attempts.append(_record(target, "success", None, completion.latency_ms, completion.first_token_ms,
                                        completion.usage.prompt_tokens, completion.usage.completion_tokens))
        outcome.completion = completion
        outcome.model = target
        return outcome
    return outcome
