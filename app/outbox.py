"""Sending a committed run to the workers, or leaving it marked for recovery.

Every caller sends only after its transaction committed. A send that fails (Redis down) empties the
run's outbox mark (`enqueued_at`), which is what the recovery sweep looks for: the run is sent as soon
as Redis is back, never stranded. This is the one place that rule lives.
"""

from __future__ import annotations

import logging
from datetime import datetime

import redis

from app.config import get_settings
from app.db import transaction
from app.dispatch import receipt_key_of_send
from app.failure_logs import warn_of
from app.redis_client import get_redis, key
from app.run_kinds import RunKind

log = logging.getLogger(__name__)


def send(kind: RunKind, ident: int, enqueued_at: datetime | None) -> bool:
    """Send a committed run, or leave it marked for recovery; False then. `enqueued_at` is the outbox mark
    the caller's transaction wrote for this send, which names its message (`app.dispatch.message_id`);
    None for a send that wrote none."""
    with kind.log_context(ident):
        if kind.send(ident, enqueued_at):
            log.info("%s %s sent to queue %s", kind.label, ident, kind.queue)
            return True
    leave_for_recovery(kind, ident)
    return False


def resend(kind: RunKind, ident: int, first_sent_at: datetime) -> bool:
    """Send again a run that a client's retry (an Idempotency-Key's replay) found still pending: its first
    request may have committed and died before its send (`first_sent_at`, the outbox mark it wrote), and the
    retry must not wait for the recovery sweep. Not when that send's receipt is in Redis (it reached the
    queue), and otherwise at most once an `AGENTQ_ENQUEUE_GRACE_SECONDS` a run: every replay sent one more
    message, so a client replaying a key in a loop during a backlog queued as many ahead of everyone's
    turns. Whether this call sent it."""
    pipe = get_redis().pipeline(transaction=False)
    pipe.exists(receipt_key_of_send(kind.actor, ident, first_sent_at))
    pipe.set(key("resent", kind.actor, ident), 1, nx=True,
             px=max(1, int(get_settings().enqueue_grace_seconds * 1000)))
    try:
        received, first = pipe.execute()
    except redis.RedisError:
        received, first = False, True  # the send meets the same Redis, and leaves the run to recovery if it fails
    return not received and bool(first) and send(kind, ident, None)


def leave_for_recovery(kind: RunKind, ident: int) -> None:
    """The run is not sent now (the send failed, or Redis already failed to answer its request): the
    recovery sweep sends it as soon as Redis answers."""
    with kind.log_context(ident):
        _clear_mark(kind, ident)


def _clear_mark(kind: RunKind, ident: int) -> None:
    try:
        with transaction() as session:
            kind.clear_outbox_mark(session, ident)
    except Exception as exc:
        warn_of(log, exc, "could not clear the outbox mark of %s %s; the recovery sweep sends it when it finds no "
                "receipt of its send, or by the stale-pending rule", kind.label, ident)
