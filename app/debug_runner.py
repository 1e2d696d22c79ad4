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
from decimal import Decimal

from app import metrics
from app.agent_setup import setup_of
from app.answer_sink import AnswerSink
from app.attempts import settling
from app.config import get_settings
from app.db import transaction
from app.debug_run_state import claim_debug_run, finish_debug_run
from app.deliveries import RunGivenUp, attempts_end_by, give_up_reason
from app.fallback import Outcome, call_with_fallback
from app.leases import Holding, keeper
from app.models import Agent, DebugRun
from app.models.base import utc_now
from app.moderation import moderate
from app.run_kinds import TEST_RUN
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


def run_debug_run(run_id: int) -> None:
    settings = get_settings()
    with transaction() as session:
        claim = claim_debug_run(session, run_id, settings.lease_seconds)
        if not claim.acquired:
            log.info("test run %s not run: %s", run_id, claim.outcome.value)
            return
        ends_by = attempts_end_by(claim.time_left)
        gives_up = give_up_reason(claim.deliveries, claim.time_left, claim.handed_back)
        if gives_up:
            finish_debug_run(session, run_id, claim.token, TurnStatus.ERROR, error_message=gives_up)
        else:
            run = session.get_one(DebugRun, run_id)
            agent = setup_of(session, session.get_one(Agent, run.agent_id))
            content, fallen_back = run.input, run.fell_back
    if gives_up:
        raise RunGivenUp(gives_up)
    token = claim.token
    assert token is not None
    started = time.monotonic()
    with keeper.running(Holding(run_id, token, threading.Event(), None)) as holding:
        verdict = moderate(content)
        if not verdict.passed:
            keeper.ending(holding)
            _record_refusal(run_id, token, verdict.error_message)
            return
        outcome = call_with_fallback(agent.primary, agent.fallback,
                                     lambda target: agent.prompt_for(target, [], content).messages,
                                     agent.params, AnswerSink(), holding.stop, ends_by=ends_by,
                                     fallen_back=fallen_back,
                                     before_fallback_call=lambda: TEST_RUN.mark_fallen_back(
                                         run_id, token, ends_by=ends_by, stop=holding.stop))
        keeper.ending(holding)
        latency_ms = int((time.monotonic() - started) * 1000)
        cost = _record_result(run_id, token, claim.deliveries, outcome, latency_ms)
        metrics.observe_cost("test_run", cost)


def _record_refusal(run_id: int, token: str, reason: str) -> None:
    """A run moderation refused ends `content_violation`, a database outage waited out as any end of a run is
    (`RunKind.write_end`): raised, the retry of its delivery would moderate the input again, and a second
    provider's verdict could let it through."""
    at = utc_now()

    def write() -> None:
        with transaction() as session:
            finish_debug_run(session, run_id, token, TurnStatus.CONTENT_VIOLATION, at=at, error_message=reason)

    TEST_RUN.write_end(run_id, at, write, what=f"ending test run {run_id}, refused by moderation")


def _record_result(run_id: int, token: str, delivery: int, outcome: Outcome, latency_ms: int) -> Decimal | None:
    """The run's result and its attempts in one transaction, a database outage waited out as a turn's
    settlement waits it (the models were paid for); the cost logged, None without an answer. A failed run
    keeps the text its last attempt produced, as a failed turn does, for the admin to see where it broke;
    it names no model, since none answered and the cost analysis counts runs under the model that did."""
    completion, model = outcome.completion, outcome.model
    cost = None
    if completion is not None and model is not None:
        cost = model.cost(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    with settling(outcome.attempts, delivery=delivery, debug_log_id=run_id) as attempts:

        def write() -> None:
            with transaction() as session:
                if completion is not None and model is not None:
                    finish_debug_run(session, run_id, token, TurnStatus.SUCCESS, at=attempts.at, output=completion.text,
                                     model=model.name, model_id=model.id, prompt_tokens=completion.usage.prompt_tokens,
                                     completion_tokens=completion.usage.completion_tokens, cost=cost,
                                     latency_ms=latency_ms, error_message=None)
                else:
                    finish_debug_run(session, run_id, token, TurnStatus.LLM_ERROR, at=attempts.at,
                                     output=outcome.partial, latency_ms=latency_ms,
                                     error_message=outcome.error_message_in_full)
                attempts.write(session)

        TEST_RUN.write_end(run_id, attempts.at, write, what=f"settling test run {run_id}")
    return cost
