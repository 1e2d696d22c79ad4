"""Finding work that fell between the cracks and sending it again. Runs in every worker process.

Four cracks, one sweep every `AGENTQ_RECOVERY_INTERVAL_SECONDS`:
- a turn accepted while its Dramatiq message could not be sent (Redis down, API process killed
  after the commit): still `pending`, its outbox mark empty or older than `AGENTQ_STALE_PENDING_SECONDS`;
- every `pending` turn after Redis lost its data (its queues went with it), noticed because the
  epoch key this module keeps in Redis is gone (it is set again once a sweep has re-sent them all);
- a `processing` turn whose lease ran out: its worker died, so another takes it over without waiting
  for Dramatiq's own redelivery;
- a `processing` turn whose worker still renews its lease but is stuck: once a delivery has run
  longer than the agent's timeout for each of its models plus `AGENTQ_TURN_GRACE_SECONDS`, its lease
  is revoked (the stuck run stops at its next write) and the turn is sent again; a turn delivered more
  than `AGENTQ_MAX_DELIVERIES` times then ends as `error`.
Sending is idempotent (a worker that finds a turn finished or owned does nothing), and a
compare-and-set on `enqueued_at` keeps several sweepers from sending the same turn twice.
"""

from __future__ import annotations

import logging
import random
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import redis
from sqlalchemy import select, update

from app import outbox
from app.config import get_settings
from app.db import transaction
from app.models import Agent, Conversation, ConversationMessage, DebugRun, Turn
from app.models.base import optional_utc as utc
from app.models.base import utc_now
from app.redis_client import get_redis, key
from app.turn_state import revoke_debug_lease, revoke_lease
from app.turn_status import TurnStatus

log = logging.getLogger(__name__)


def epoch_key() -> str:
    """Set by the first sweep after Redis starts empty; its absence means Redis lost its data."""
    return key("epoch")


@dataclass
class RecoveryReport:
    sent: list[int] = field(default_factory=list)
    debug_sent: list[int] = field(default_factory=list)
    redis_lost: bool = False
    unsent: int = 0


def _redis_lost_its_data() -> bool:
    """True while the epoch key is missing: Redis restarted empty or was flushed, and its queues with it.

    The key is set again only by a sweep that has re-sent every pending turn (`_mark_epoch`), so a
    sweep that dies half-way (database down, process killed) leaves the work to the next one.
    """
    try:
        return not get_redis().exists(epoch_key())
    except redis.RedisError:
        return False


def _mark_epoch() -> None:
    try:
        get_redis().set(epoch_key(), utc_now().isoformat(), nx=True)
    except redis.RedisError:
        log.warning("could not mark Redis as recovered; the next sweep re-sends pending turns again")


def _claim_send(model: type[Turn] | type[DebugRun], ident_column, ident: int, seen: datetime | None) -> bool:  # type: ignore[no-untyped-def]
    """Compare-and-set the outbox mark so only one sweeper sends this turn now."""
    guard = model.enqueued_at.is_(None) if seen is None else model.enqueued_at == seen
    with transaction() as session:
        return session.execute(
            update(model).where(ident_column == ident, guard).values(enqueued_at=utc_now())
            .execution_options(synchronize_session=False)
        ).rowcount == 1


def _due(status: str, enqueued_at: datetime | None, created_at: datetime, lease_expires_at: datetime | None,
         now: datetime, redis_lost: bool) -> bool:
    settings = get_settings()
    if status == TurnStatus.PENDING:
        if redis_lost:
            return True
        if enqueued_at is None:
            return created_at < now - timedelta(seconds=settings.enqueue_grace_seconds)
        return enqueued_at < now - timedelta(seconds=settings.stale_pending_seconds)
    lease_over = lease_expires_at is None or lease_expires_at < now
    recently_sent = enqueued_at is not None and enqueued_at > now - timedelta(seconds=settings.lease_seconds)
    return lease_over and not recently_sent


def _overdue(status: str, processing_since: datetime, lease_expires_at: datetime | None, timeout_seconds: int,
             has_fallback: bool, now: datetime) -> bool:
    """A live lease on a delivery that has outrun every model attempt it could make, plus the grace."""
    if status != TurnStatus.PROCESSING or lease_expires_at is None or lease_expires_at < now:
        return False
    bound = timeout_seconds * (2 if has_fallback else 1) + get_settings().turn_grace_seconds
    return processing_since < now - timedelta(seconds=bound)


def _revoke_overdue(ident: int, token: str | None, *, debug: bool = False) -> bool:
    if token is None:
        return False
    with transaction() as session:
        revoked = (revoke_debug_lease if debug else revoke_lease)(session, ident, token)
    if revoked:
        log.warning("%s %s ran past its timeout and grace; its lease is revoked and it is sent again",
                    "test run" if debug else "turn", ident)
    return revoked


def recover_once() -> RecoveryReport:
    report = RecoveryReport(redis_lost=_redis_lost_its_data())
    now = utc_now()
    in_flight = (TurnStatus.PENDING.value, TurnStatus.PROCESSING.value)
    with transaction() as session:
        turns = session.execute(
            select(Turn.assistant_message_id, ConversationMessage.status, Turn.enqueued_at, Turn.created_at,
                   Turn.lease_expires_at, Turn.lease_token, ConversationMessage.updated_at, Agent.timeout_seconds,
                   Agent.fallback_model_id)
            .join(ConversationMessage, ConversationMessage.id == Turn.assistant_message_id)
            .join(Conversation, Conversation.id == Turn.conversation_id)
            .join(Agent, Agent.id == Conversation.agent_id)
            .where(ConversationMessage.role == "assistant", ConversationMessage.status.in_(in_flight))
        ).all()
        runs = session.execute(
            select(DebugRun.id, DebugRun.status, DebugRun.enqueued_at, DebugRun.created_at, DebugRun.lease_expires_at,
                   DebugRun.lease_token, DebugRun.updated_at, Agent.timeout_seconds, Agent.fallback_model_id)
            .join(Agent, Agent.id == DebugRun.agent_id)
            .where(DebugRun.status.in_(in_flight))
        ).all()
    for ident, status, enqueued_at, created_at, lease, token, since, timeout, fallback in turns:
        overdue = _overdue(status, utc(since), utc(lease), timeout, fallback is not None, now) \
            and _revoke_overdue(ident, token)
        due = overdue or _due(status, utc(enqueued_at), utc(created_at), utc(lease), now, report.redis_lost)
        if due and _claim_send(Turn, Turn.assistant_message_id, ident, enqueued_at):
            if outbox.send_turn(ident):
                report.sent.append(ident)
            else:
                report.unsent += 1
    for ident, status, enqueued_at, created_at, lease, token, since, timeout, fallback in runs:
        overdue = _overdue(status, utc(since), utc(lease), timeout, fallback is not None, now) \
            and _revoke_overdue(ident, token, debug=True)
        due = overdue or _due(status, utc(enqueued_at), utc(created_at), utc(lease), now, report.redis_lost)
        if due and _claim_send(DebugRun, DebugRun.id, ident, enqueued_at):
            if outbox.send_debug_run(ident):
                report.debug_sent.append(ident)
            else:
                report.unsent += 1
    if report.redis_lost and report.unsent == 0:
        _mark_epoch()
    if report.sent or report.debug_sent:
        log.info("recovery re-sent turns %s and test runs %s (redis lost data: %s)",
                 report.sent, report.debug_sent, report.redis_lost)
    return report


class RecoveryLoop:
    """The sweep on a timer, in a daemon thread, with jitter so processes do not sweep in step."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="recovery", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        interval = get_settings().recovery_interval_seconds
        while not self._stop.wait(interval * random.uniform(0.5, 1.0)):
            try:
                recover_once()
            except Exception:
                log.warning("recovery sweep failed; retrying", exc_info=True)


__all__ = ["RecoveryLoop", "RecoveryReport", "recover_once"]
