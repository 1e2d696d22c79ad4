"""Running an admin's execution test: the same moderation, timeout and fallback as a user turn, no money.

The result goes to the admin debug log (model that answered, tokens, cost at the model's prices,
latency, status, error), which is what the cost analysis sums; no balance or ledger is touched.
Delivery is at least once: the claim on the log row makes a redelivered message a no-op, and the
final write is guarded by the lease, so a worker that lost the run to another writes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from app import metrics
from app.agent_setup import AgentSetup, setup_of
from app.answer_sink import AnswerSink
from app.attempts import AttemptRecord, settling
from app.config import get_settings
from app.db import transaction
from app.debug_run_state import claim_debug_run, finish_debug_run
from app.deliveries import RunGivenUp, attempts_end_by, give_up_reason
from app.leases import Holding, keeper
from app.model_calls import Outcome, call_with_fallback
from app.models import Agent, DebugRun
from app.moderation import moderate
from app.run_kinds import DEBUG_RUN
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _ClaimedRun:
    """What a delivery that took the run goes on with: its lease and delivery number, the time its model
    calls have, and the run's inputs as the claim read them."""

    run_id: int
    token: str
    delivery: int
    ends_by: float | None
    agent: AgentSetup
    content: str
    fell_back: bool


def run_debug_run(run_id: int) -> None:
    claimed = _claim(run_id)
    if claimed is not None:
        _run(claimed)


def _claim(run_id: int) -> _ClaimedRun | None:
    """Take the run, or give it up (`RunGivenUp`, for Dramatiq to dead-letter) when its deliveries or its time
    ran out; None when another delivery holds it or it has ended."""
    with transaction() as session:
        claim = claim_debug_run(session, run_id, get_settings().lease_seconds)
        if not claim.acquired or claim.token is None:
            log.info("test run %s not run: %s", run_id, claim.outcome.value)
            return None
        gives_up = give_up_reason(claim.deliveries, claim.time_left, claim.handed_back)
        if gives_up:
            finish_debug_run(session, run_id, claim.token, TurnStatus.ERROR, error_message=gives_up)
        else:
            run = session.get_one(DebugRun, run_id)
            agent = setup_of(session, session.get_one(Agent, run.agent_id))
            claimed = _ClaimedRun(run_id, claim.token, claim.deliveries, attempts_end_by(claim.time_left), agent,
                                  run.input, run.fell_back)
    if gives_up:
        raise RunGivenUp(gives_up)
    return claimed


def _run(claimed: _ClaimedRun) -> None:
    """Moderate, call the models, and record the end; the run is marked `ending` before its end is written,
    whatever it is: a hand-back at shutdown leaves it to finish (handed back, its answer would be paid twice,
    or its refused input moderated again, which fails open)."""
    run_id, token, agent, content, ends_by = (claimed.run_id, claimed.token, claimed.agent, claimed.content,
                                              claimed.ends_by)
    started = time.monotonic()
    with keeper.running(Holding(run_id, token, threading.Event(), None, delivery=claimed.delivery)) as holding:
        verdict = moderate(content)
        outcome = None if not verdict.passed else call_with_fallback(
            agent.primary, agent.fallback, lambda target: agent.prompt_for(target, [], content).messages,
            agent.params, AnswerSink(), holding.stop, ends_by=ends_by, fell_back=claimed.fell_back,
            before_fallback_call=lambda: DEBUG_RUN.mark_fell_back(run_id, token, ends_by=ends_by,
                                                                  stop=holding.stop))
        keeper.ending(holding, stopped=outcome is not None and outcome.cut_short)
        if outcome is None:
            _record_end(run_id, token, claimed.delivery, (), TurnStatus.CONTENT_VIOLATION,
                        error_message=verdict.error_message)
            return
        latency_ms = int((time.monotonic() - started) * 1000)
        cost = _record_result(run_id, token, claimed.delivery, outcome, latency_ms)
        metrics.observe_cost("test_run", cost)


def _record_result(run_id: int, token: str, delivery: int, outcome: Outcome, latency_ms: int) -> Decimal | None:
    """The run's result: the cost logged, None without an answer. A failed run keeps the text its last attempt
    produced, as a failed turn does, for the admin to see where it broke; it names no model, since none
    answered and the cost analysis counts runs under the model that did."""
    completion, model, cost = outcome.completion, outcome.model, outcome.answer_cost
    if completion is None or model is None:
        _record_end(run_id, token, delivery, outcome.attempts, TurnStatus.LLM_ERROR, output=outcome.partial,
                    latency_ms=latency_ms, error_message=outcome.error_message_in_full)
        return None
    _record_end(run_id, token, delivery, outcome.attempts, TurnStatus.SUCCESS, output=completion.text,
                model=model.name, model_id=model.id, prompt_tokens=completion.usage.prompt_tokens,
                completion_tokens=completion.usage.completion_tokens, cost=cost, latency_ms=latency_ms,
                error_message=None)
    return cost


def _record_end(run_id: int, token: str, delivery: int, attempts: Sequence[AttemptRecord], status: TurnStatus,
                **result: Any) -> None:
    """The run's end and its attempts in one transaction, a database outage waited out as a turn's settlement
    waits it (`RunKind.write_end`: the models were paid for)."""
    with settling(attempts, delivery=delivery, debug_log_id=run_id) as recorded:

        def write() -> None:
            with transaction() as session:
                finish_debug_run(session, run_id, token, status, at=recorded.at, **result)
                recorded.write(session)

        DEBUG_RUN.write_end(run_id, recorded.at, write, what=f"settling test run {run_id}")
