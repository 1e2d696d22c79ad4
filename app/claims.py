"""Who may run a run (a turn or an admin test run) under which lease, decided once for both kinds.

A delivery's claim locks the run's row and asks `judge_claim` whether it takes the run, with which lease
and by which deadline; the two state machines (`app.turn_state`, `app.debug_run_state`) only write what it
decided. The lease's rules in SQL (`lease_over`, `lease_not_held`) are the recovery sweep's and the bounds'
way of asking the same question of many rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING

from sqlalchemy import ColumnElement, or_

from app.clock import lease_expiry, lease_time
from app.deliveries import Deadline, delivery_deadline
from app.fallback import most_calls
from app.lease_tokens import new_lease_token
from app.models.base import optional_utc as utc
from app.turn_status import TurnStatus

if TYPE_CHECKING:
    from app.turn_state import TurnInputs, TurnRow


class LeaseLost(RuntimeError):
    """Another worker took the run over; this one must stop writing."""


class Claim(Enum):
    """What a delivery's claim found: the run is its own (claimed pending, or taken over from a delivery that
    holds it no more), another delivery's, ended, or gone."""

    CLAIMED = "claimed"
    TAKEN_OVER = "taken_over"
    OWNED_ELSEWHERE = "owned_elsewhere"
    FINISHED = "finished"
    MISSING = "missing"

    @property
    def acquires(self) -> bool:
        """The run is this worker's from now on."""
        return self in (Claim.CLAIMED, Claim.TAKEN_OVER)


@dataclass(frozen=True, slots=True)
class ClaimDecision:
    """What a claim decided: an outcome and, for one that takes the run, its new lease (a token and when it
    runs out) and the delivery's deadline."""

    outcome: Claim
    token: str = ""
    lease_expires_at: datetime | None = None
    deadline: Deadline | None = None


@dataclass(frozen=True, slots=True)
class ClaimResult:
    """A claim's outcome; a taken run comes with its lease token and `deliveries`, the number of this
    delivery (for `app.deliveries.give_up_reason`), and a turn with its `inputs`, read under the lock:
    the user's message and the agent's settings and models.
    `affordable` is False when the worst case the caller asked to hold was not available; `time_left` is
    the model time the delivery has before its run's deadline (`app.deliveries.Deadline`)."""

    outcome: Claim
    turn: TurnRow | None = None
    token: str | None = None
    deliveries: int = 0
    inputs: TurnInputs | None = None
    handed_back: int = 0
    """How many deliveries since the last requeue were handed back by a worker's graceful stop (`Turn.handed_back`)."""
    affordable: bool = True
    time_left: float | None = None
    predecessor: int | None = None
    """The delivery whose lease this claim took over while it still held its token: its worker died (or was
    cut off) mid-run, and the model calls it made are recorded by no one else (`app.interrupted_calls`)."""

    @property
    def acquired(self) -> bool:
        return self.outcome.acquires


def judge_claim(status: str, lease_token: str | None, lease_expires_at: datetime | None,
                stored_deadline: datetime | None, now: datetime | None, *, timeout_seconds: float,
                has_fallback: bool, lease_seconds: float) -> ClaimDecision:
    """The claim of a run read under its lock, `now` being the database's time read with it: who runs it
    (`claim_outcome`), and, when this delivery does, a new lease from `now` and the delivery's deadline (a
    run taken over keeps its `stored_deadline`: `app.deliveries.delivery_deadline`)."""
    judged_at = lease_time(now)
    outcome = claim_outcome(status, lease_token, lease_expires_at, judged_at)
    if not outcome.acquires:
        return ClaimDecision(outcome)
    deadline = delivery_deadline(judged_at, timeout_seconds, most_calls(has_fallback=has_fallback),
                                 stored=utc(stored_deadline), taken_over=outcome is Claim.TAKEN_OVER)
    return ClaimDecision(outcome, new_lease_token(), lease_expiry(judged_at, lease_seconds), deadline)


def claim_outcome(status: str, lease_token: str | None, lease_expires_at: datetime | None, now: datetime) -> Claim:
    """Who may run a turn (or admin test run) in `status` now: a pending one is claimed, a processing
    one is taken over once no delivery holds it (its worker died, or a failed delivery handed it to
    its retry), an ended one is left alone."""
    if TurnStatus(status).is_terminal:
        return Claim.FINISHED
    if status != TurnStatus.PROCESSING:
        return Claim.CLAIMED
    return Claim.OWNED_ELSEWHERE if lease_held(lease_token, lease_expires_at, now) else Claim.TAKEN_OVER


def lease_held(lease_token: str | None, lease_expires_at: datetime | None, now: datetime) -> bool:
    """Some delivery still holds the run: it renews the lease, or died less than a lease ago. A lease
    without a token was revoked (`app.run_kinds.RunKind.revoke_lease`): nobody holds it."""
    expires = utc(lease_expires_at)
    return lease_token is not None and expires is not None and expires > now


def lease_over(lease_expires_at: ColumnElement[datetime | None], now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """The recovery sweep's rule: the run's lease ran out, and with it the time a failed delivery gave its
    retry (a given-up lease keeps an expiry for that: `app.deliveries.retry_hand_over`). Until then a
    given-up run is free for the retry's claim but not sent again by the sweep."""
    return or_(lease_expires_at.is_(None), lease_expires_at <= now)


def lease_not_held(lease_token: ColumnElement[str | None], lease_expires_at: ColumnElement[datetime | None],
                   now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """`lease_held`'s rule in SQL, negated: no delivery holds the run (its lease revoked, handed to a retry, or
    run out)."""
    return or_(lease_token.is_(None), lease_over(lease_expires_at, now))
