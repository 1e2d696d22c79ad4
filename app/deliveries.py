"""How many times a run may be delivered, how long a delivery may take, and when a failed one is retried.

A turn or an admin test run is delivered again when its worker died (its lease ran out) or it ran
past its deadline (revoked and sent again, that delivery ends it); both rules live here, so the claim
that writes the deadline, the recovery sweep that finds a delivery overdue and the runners that give a
run up agree on them. So does the rule
that decides whether a message whose delivery raised is retried or dead-lettered (`retry_failed`), and
the exception that dead-letters the message of a run given up (`RunGivenUp`), and how long the send of a
retry waits out Redis refusing it (`send_retry`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar, overload

from sqlalchemy import ColumnElement, SQLColumnExpression

from app.config import get_settings
from app.outages import is_outage, waiting_out_outages

T = TypeVar("T")


def retry_failed(retries: int, exception: BaseException) -> bool:
    """Dramatiq's `retry_when`: whether a message whose delivery raised is sent again after its backoff
    (`AGENTQ_MIN_BACKOFF_MS` doubling up to `AGENTQ_MAX_BACKOFF_MS`) rather than dead-lettered.

    An outage is waited out for `AGENTQ_OUTAGE_RETRIES` retries (about eight minutes with the default
    backoff): a worker that cannot reach PostgreSQL fails every claim at once, so a restart of a few
    seconds used up `AGENTQ_MAX_RETRIES` of every run it took meanwhile and dead-lettered them all, to be
    requeued by hand. Any other error is retried `AGENTQ_MAX_RETRIES` times."""
    settings = get_settings()
    return retries < (settings.outage_retries if is_outage(exception) else settings.max_retries)


def outage_wait_seconds() -> float:
    """The longest a delivery waits an outage out: `AGENTQ_OUTAGE_RETRIES` backoffs of at most
    `AGENTQ_MAX_BACKOFF_MS` (ten minutes by default). A run that has finished its model calls waits as long
    for its settlement to be written (`app.outages.waiting_out_outages`) before giving the run to a retry
    that would call the model again."""
    settings = get_settings()
    return settings.outage_retries * settings.max_backoff_ms / 1000


def retry_hand_over() -> timedelta:
    """How long a delivery that raised leaves its run to Dramatiq's retry before the recovery sweep may
    send it again: as long as the sweep trusts the message of a pending turn (`AGENTQ_STALE_PENDING_SECONDS`),
    since the retry, once its backoff is over, waits in the same queue behind the same backlog.

    The failed delivery gives its lease up, so the retry's claim takes the run over at once; were the
    sweep to send the run meanwhile too, the two deliveries would each count one towards
    `AGENTQ_MAX_DELIVERIES`, and a run failing the same way every time would be given up with "gave up
    after N deliveries" before its retries ran out: no dead letter naming the error, nothing to requeue
    once it is fixed. A retry lost with Redis's data is sent again by the sweep that notices the loss,
    as pending turns are (`app.recovery`)."""
    return timedelta(seconds=get_settings().stale_pending_seconds)


def send_retry(send: Callable[[], T], *, what: str, failed_at_ms: int | None, stopping: Callable[[], bool]) -> T:
    """`send()`, a retry's send, with a Redis out of reach or refusing writes waited out for as long as the retry
    owns its run: `retry_hand_over` from the failure (`failed_at_ms`, the Retries middleware's
    `requeue_timestamp`), after which the recovery sweep sends the run itself; Dramatiq would write the retry
    off, its run left to the stale-pending rule (five minutes by default). A send that waits holds only the
    thread that failed the delivery, or the delay queue's
    consumer, neither of which has other work while Redis refuses it; it stops waiting when the process stops
    (`stopping`), so that a shutdown is not held up by it.

    Waiting can make two deliveries of the run: an outage longer than the broker's heartbeat lets another
    worker take back what this one held, and a Redis restarted empty lets the sweep send the run, while this
    send still goes out once Redis takes it. The run's claim lets only one of them run it
    (`app.claims`), and the other ends as a no-op."""
    hand_over = retry_hand_over().total_seconds()
    left = failed_at_ms / 1000 + hand_over - time.time() if failed_at_ms is not None else hand_over
    return waiting_out_outages(send, for_seconds=max(left, 0.0), what=what, stopping=stopping)


SETTLEMENT_RESERVE_SECONDS = 5.0
"""What a delivery that took a run over keeps back from its deadline for settling it (less when the
grace itself is shorter): a settlement takes milliseconds, and one past the deadline would be revoked."""


@dataclass(frozen=True, slots=True)
class Deadline:
    """The deadline a delivery writes with its lease, and the model time it has left before it."""

    at: datetime
    time_left: float
    """Seconds the delivery may still spend on model attempts: its deadline less the settlement's reserve.
    The delivery that set the deadline has every attempt's whole timeout and the grace in it; one that
    inherited the deadline has what an earlier delivery left. Each attempt is still bounded by the agent's
    timeout."""


def delivery_deadline(now: datetime, timeout_seconds: float, calls: int, *,
                      stored: datetime | None, taken_over: bool) -> Deadline:
    """The deadline of a delivery starting at `now`: set by the delivery that claims a pending run (its
    first, or its first since a requeue) to every model attempt it could make (`calls` of `timeout_seconds`:
    `app.fallback.most_calls`) plus the grace; a delivery
    that takes the run over from another keeps the `stored` one.

    Kept, not renewed: a run whose worker dies or hangs at every delivery would otherwise get the whole
    timeout again each time, and stay `processing` for `AGENTQ_MAX_DELIVERIES` times its timeouts;
    guarantee 1 bounds it by its timeouts plus the recovery time. A requeue starts a new budget (the run
    is pending again, so its next delivery claims it rather than taking it over).

    The delivery taking over may spend on its model all that is left before the deadline but the
    settlement's reserve, the grace included: the grace (60 s) is what covers the recovery itself (a lease
    of 30 s and a sweep), and keeping all of it back would leave a delivery that took over after a
    crash no model time at all unless the agent's timeout outlasted the recovery."""
    reserve = min(SETTLEMENT_RESERVE_SECONDS, get_settings().turn_grace_seconds)
    if taken_over and stored is not None:
        return Deadline(stored, (stored - now).total_seconds() - reserve)
    bound = timeout_seconds * calls + get_settings().turn_grace_seconds
    return Deadline(now + timedelta(seconds=bound), bound - reserve)


DELIVERIES_PER_REQUEUE = 1000
"""A requeued run's deliveries (a turn's or an admin test run's) are numbered on from the next thousand. A
delivery's number names the attempts it makes (`model_attempts.delivery`, and a turn's streamed attempts,
`app.live_stream.attempt_number`), which must never repeat within a run: a client resuming with an event id
of the run before the requeue would be sent the wrong part of the new answer, and the attempts recorded
before and after a requeue could not be told apart. The give-up rule counts only the deliveries since the
requeue (`deliveries_since_requeue`), or a run that died after several deliveries would be given up at once."""


def deliveries_since_requeue(deliveries: int) -> int:
    return deliveries % DELIVERIES_PER_REQUEUE


def first_delivery_since_requeue(deliveries: int) -> int:
    """The number of the run's first delivery since its last requeue (1 for a turn never requeued)."""
    return deliveries - deliveries_since_requeue(deliveries) + 1


@overload
def deliveries_at_requeue(deliveries: int) -> int: ...


@overload
def deliveries_at_requeue(deliveries: SQLColumnExpression[int]) -> ColumnElement[int]: ...


def deliveries_at_requeue(deliveries: int | SQLColumnExpression[int]) -> int | ColumnElement[int]:
    """Where a requeued run's count starts: the next thousand, none of it yet since the requeue. Given a
    column, the same rule as SQL, for a requeue written as one guarded UPDATE."""
    return (deliveries // DELIVERIES_PER_REQUEUE + 1) * DELIVERIES_PER_REQUEUE


def attempts_end_by(time_left: float | None) -> float | None:
    """A delivery's model time as a moment of this process's monotonic clock, taken when its claim is read:
    what comes before the first call (moderation, the history) is counted too."""
    return None if time_left is None else time.monotonic() + time_left


def fallback_mark_wait(ends_by: float | None) -> float:
    """How long a delivery waits a database outage out to record its switch to the fallback
    (`RunKind.mark_fell_back`): the model time it has left (`ends_by`, from `attempts_end_by`), less a
    connection timeout, which a try started at the limit may still take. The fallback's call then gets what
    remains, or is not made. None (a delivery run without a deadline, which only a test builds): one try."""
    if ends_by is None:
        return 0.0
    return max(ends_by - time.monotonic() - get_settings().db_connect_timeout_seconds, 0.0)


class RunGivenUp(Exception):
    """Raised by a delivery once it has ended its run as `error` for `give_up_reason`, so that its message is
    dead-lettered, not acknowledged: a run that keeps killing or stalling its workers is a poison message, and
    the dead letters are where an operator finds it, with the reason, and requeues it once the cause is
    fixed (a requeue starts a new count of deliveries and a new deadline). The actors declare it (Dramatiq's
    `throws`), so it is never retried: the run has ended already."""


def give_up_reason(deliveries: int, time_left: float | None, handed_back: int = 0) -> str | None:
    """Why a delivery ends its run (a turn or an admin test run) as `error` without a model call, or None:
    delivered more than `AGENTQ_MAX_DELIVERIES` times since the last requeue, whatever keeps killing or
    stalling it, or started with no model time left before the deadline its first delivery set. The
    `handed_back` deliveries (a worker's graceful stop gave them up: `app.leases.LeaseKeeper.hand_back`) do not
    count: a rolling restart during a long answer ended a healthy run `error`, its model paid for each time."""
    since_requeue = deliveries_since_requeue(deliveries)
    counted = since_requeue - handed_back
    if counted > get_settings().max_deliveries:
        apart = f", not counting {handed_back} handed back at a worker's stop" if handed_back else ""
        died = counted - 1
        return f"gave up after {died} {'delivery' if died == 1 else 'deliveries'}{apart}"
    if time_left is not None and time_left <= 0:
        return (f"gave up at delivery {since_requeue}: the run's deadline (each model's timeout and the grace, "
                "counted from its first delivery) left no time for a model call")
    return None
