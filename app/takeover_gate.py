"""When a process may act on the leases that ran out: the recovery sweep's takeovers, and the API's ends of runs no
worker holds (`app.unheld_run_bounds`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.orm import Session

from app.clock import lease_now
from app.db import transaction
from app.leases import renewal_seconds
from app.outages import is_outage


class TakeoverGate:
    """Whether a process may act on leases that ran out (take the runs over, or end them): once the database has
    answered its looks for a renewal period (`renewal_seconds`). After an outage longer than a lease every lease
    has run out, and a worker still streaming, or holding a finished answer it waits to write, renews its own
    within that period of the database being back; acted on first, its turn would be run again upstream and
    paid twice, or ended as `error` with its answer lost. A process's start cannot tell whether the database
    was just away, so it waits the period too. A look whose first answer took longer than a renewal period
    shuts it as an outage does: a connection that hung through a network partition raises no error, and live
    holders cut off as long renew first."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._answering_since: float | None = None

    @property
    def open(self) -> bool:
        return self._answering_since is not None and self.clock() - self._answering_since >= renewal_seconds()

    def answered(self, asked_at: float) -> None:
        """A look asked the database at `asked_at` (`clock`) and has just had its first answer."""
        now = self.clock()
        if self._answering_since is None or now - asked_at > renewal_seconds():
            self._answering_since = now

    def failed(self, error: BaseException) -> None:
        if is_outage(error):
            self._answering_since = None

    def database_now(self, session: Session) -> datetime:
        """The database's time to judge leases by, read as a look's first statement, whose answer feeds the gate."""
        asked_at = self.clock()
        now = lease_now(session)
        self.answered(asked_at)
        return now

    def now_if_open(self) -> datetime | None:
        """`database_now` in a transaction of its own; None while the gate is shut."""
        with transaction() as session:
            now = self.database_now(session)
        return now if self.open else None
