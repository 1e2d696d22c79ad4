"""How many times a run may be delivered, how long a delivery may take, and when a failed one is retried.

A turn or an admin test run is delivered again when its worker died (its lease ran out) or it ran
past its deadline; both rules live here, so the claim that writes the deadline, the recovery sweep
that finds a delivery overdue and the runners that give a run up agree on them. So does the rule
that decides whether a message whose delivery raised is retried or dead-lettered (`retry_failed`).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from app.config import get_settings
from app.outages import is_outage


def retry_failed(retries: int, exception: BaseException) -> bool:
    """Dramatiq's `retry_when`: whether a message whose delivery raised is sent again after its backoff
    (`AGENTQ_MIN_BACKOFF_MS` doubling up to `AGENTQ_MAX_BACKOFF_MS`) rather than dead-lettered.

    An outage is waited out for `AGENTQ_OUTAGE_RETRIES` retries (about eight minutes with the default
    backoff): a worker that cannot reach PostgreSQL fails every claim at once, so a restart of a few
    seconds used up `AGENTQ_MAX_RETRIES` of every run it took meanwhile and dead-lettered them all, to be
    requeued by hand. Any other error is retried `AGENTQ_MAX_RETRIES` times."""
    settings = get_settings()
    return retries < (settings.outage_retries if is_outage(exception) else settings.max_retries)


def delivery_deadline(now: datetime, timeout_seconds: float, has_fallback: bool) -> datetime:
    """When a delivery started at `now` has outrun every model attempt it could make, plus the grace."""
    bound = timeout_seconds * (2 if has_fallback else 1) + get_settings().turn_grace_seconds
    return now + timedelta(seconds=bound)


DELIVERIES_PER_REQUEUE = 1000
"""A requeued turn's deliveries are numbered on from the next thousand. A delivery's number names the
attempts it streams (`app.live_stream.attempt_number`), which must never repeat within a turn, or a
client resuming with an event id of the run before the requeue would be sent the wrong part of the
new answer; the give-up rule counts only the deliveries since the requeue (`deliveries_since_requeue`),
or a turn that died after several deliveries would be given up at once."""


def deliveries_since_requeue(deliveries: int) -> int:
    return deliveries % DELIVERIES_PER_REQUEUE


def given_up(deliveries: int) -> bool:
    """Delivered more than `AGENTQ_MAX_DELIVERIES` times since the last requeue: the run (a turn or an
    admin test run) ends as `error` without a model call, whatever keeps killing or stalling it."""
    return deliveries_since_requeue(deliveries) > get_settings().max_deliveries


def gave_up_reason(deliveries: int) -> str:
    return f"gave up after {deliveries_since_requeue(deliveries) - 1} deliveries"
