"""Recording the upstream attempts of a run, and counting them in the metrics, once, whether its
settlement commits or fails.

An attempt's row is written in the transaction that settles its run, so a finished run and the record of
what it cost upstream commit together. The provider is paid for an attempt whether or not that
settlement commits, though: one refused (its lease lost to another delivery, a database error, a bug)
would take the rows with it, and the cost they came to would be recorded nowhere. `RunAttempts` writes
them then on their own. The attempts of a worker killed before it settles were only in its memory: the
delivery that takes its turn over records what they streamed (`record_interrupted`, from
`app.interrupted_calls`), estimates a late write of the real ones replaces. While the database is away
nothing can be recorded (the log line lists them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from sqlalchemy import bindparam, delete, exists, insert, select
from sqlalchemy.orm import Session

from app import metrics
from app.db import rows_changed, transaction
from app.failure_kinds import FailureKind
from app.models import ModelAttempt, Turn, table
from app.models.base import utc_now
from app.prepared import Batch, Prepared, Unit

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One upstream call of a run, as its `model_attempts` row keeps it."""

    model_name: str
    outcome: str
    error: str | None
    latency_ms: int
    first_token_ms: int | None
    prompt_tokens: int | None
    completion_tokens: int | None
    cost: Decimal | None


_COLUMNS = ("message_id", "debug_log_id", "delivery", "model_name", "outcome", "error", "latency_ms",
            "first_token_ms", "prompt_tokens", "completion_tokens", "cost", "created_at")


@cache
def _insert() -> Prepared:
    return Prepared(insert(table(ModelAttempt)).values({name: bindparam(name) for name in _COLUMNS}))


class RunAttempts:
    """The attempts of one delivery of a run (a turn's answer message, or an admin test run's log row),
    stamped with one time, which tells whether a settlement that seemed to fail wrote them after all."""

    def __init__(self, attempts: Sequence[AttemptRecord], *, delivery: int, message_id: int | None = None,
                 debug_log_id: int | None = None) -> None:
        self.attempts = tuple(attempts)
        self.delivery = delivery
        self.message_id = message_id
        self.debug_log_id = debug_log_id
        self.at = utc_now()

    def write(self, unit: Unit | Batch) -> None:
        """Their rows, in the settlement's transaction."""
        if self.attempts:
            _insert()(unit, self._rows())

    def _rows(self) -> list[dict[str, Any]]:
        return [
            {"message_id": self.message_id, "debug_log_id": self.debug_log_id, "delivery": self.delivery,
             "model_name": a.model_name,
             "outcome": a.outcome, "error": a.error, "latency_ms": a.latency_ms, "first_token_ms": a.first_token_ms,
             "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "cost": a.cost,
             "created_at": self.at}
            for a in self.attempts
        ]

    def write_unsettled(self) -> bool:
        """Their rows on their own, after the settlement failed; none if it committed after all (its commit's
        answer lost with the connection: its rows carry this stamp). If even this fails, the log line is
        the only record of what they cost. Whether they replaced the estimates of the delivery that took the
        turn over (`record_interrupted`), which the metrics counted already."""
        if not self.attempts:
            return False
        replaced = False
        rows = table(ModelAttempt)
        owner = (rows.c.message_id == self.message_id if self.message_id is not None
                 else rows.c.debug_log_id == self.debug_log_id)
        try:
            with transaction() as session:
                if self.message_id is not None:
                    # The delivery that took the turn over may have recorded these calls as interrupted, from
                    # what they streamed: the real records replace those estimates.
                    _lock_turn(session, self.message_id)
                    replaced = rows_changed(session, delete(rows).where(
                        owner, rows.c.delivery == self.delivery,
                        rows.c.outcome == FailureKind.INTERRUPTED.value)) > 0
                if not session.scalar(select(exists().where(owner, rows.c.created_at == self.at))):
                    _insert()(session, self._rows())
        except Exception:
            log.warning("could not record the attempts of a run whose settlement failed (message %s, test run %s): %s",
                        self.message_id, self.debug_log_id,
                        ", ".join(f"{a.model_name} {a.outcome} cost {a.cost}" for a in self.attempts), exc_info=True)
            return False
        return replaced


def _lock_turn(session: Session, turn_id: int) -> None:
    """The turn's row: the writers of one delivery's records, its own late one and the one of the delivery
    that took the turn over, take it first, so the second to commit sees the first's rows."""
    session.execute(select(Turn.assistant_message_id).where(Turn.assistant_message_id == turn_id).with_for_update())


def record_interrupted(turn_id: int, delivery: int, attempts: Sequence[AttemptRecord]) -> bool:
    """Record `attempts`, the calls of an earlier `delivery` of the turn whose worker stopped mid-run, unless
    that delivery recorded its calls itself (it was only cut off, and came back first); whether they were
    written. Counted in the metrics as written."""
    rows = table(ModelAttempt)
    with transaction() as session:
        _lock_turn(session, turn_id)
        if session.scalar(select(exists().where(rows.c.message_id == turn_id, rows.c.delivery == delivery))):
            return False
        RunAttempts(attempts, delivery=delivery, message_id=turn_id).write(session)
    metrics.observe_attempts(attempts)
    return True


@contextmanager
def settling(attempts: Sequence[AttemptRecord], *, delivery: int, message_id: int | None = None,
             debug_log_id: int | None = None,
             settled_again_after: tuple[type[Exception], ...] = ()) -> Iterator[RunAttempts]:
    """Around the settlement of a run whose delivery made `attempts`: the settlement writes them
    (`RunAttempts.write`); if it raises, they are written on their own, unless it raised one of
    `settled_again_after`, after which the caller settles again with the same attempts. Either way they
    are counted in the metrics once."""
    run_attempts = RunAttempts(attempts, delivery=delivery, message_id=message_id, debug_log_id=debug_log_id)
    try:
        yield run_attempts
    except settled_again_after:
        raise
    except Exception:
        if not run_attempts.write_unsettled():  # estimates it replaced were counted as the calls were
            metrics.observe_attempts(run_attempts.attempts)
        raise
    metrics.observe_attempts(run_attempts.attempts)
