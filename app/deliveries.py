"""How many times a run may be delivered, and how long a delivery may take.

A turn or an admin test run is delivered again when its worker died (its lease ran out) or it ran
past its deadline; both rules live here, so the claim that writes the deadline, the recovery sweep
that finds a delivery overdue and the runners that give a run up agree on them.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from app.config import get_settings


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
