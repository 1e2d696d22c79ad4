"""Whether this worker process reaches its database: while it does not, it takes no new run.

A worker process cut off from the database alone (a partition of its host, a firewall rule, a pooler on
its host gone) while Redis and the other workers were not kept fetching turns: each failed at its claim
and went to its outage retry, and the idle process won the next fetch races too, so a turn waited for a
healthy worker to win one (a p90 of 10.7 s to a claim, at worst 56 s, against 0.2 s with no worker cut off).
So a delivery that fails because the database is out of reach marks its process cut off: its consumers
fetch nothing more (`workers.consumer.RefillingConsumer`), and the runs stay in Redis for the other
workers, until a probe of its own (a `SELECT 1` every `PROBE_SECONDS`) is answered. When every worker is
cut off (the database itself is down) the runs wait in Redis for it rather than in retries, each of
which counts towards `AGENTQ_OUTAGE_RETRIES` and ends in a dead letter when an outage outlasts them.

A run already fetched when the mark is set fails and is retried as before; at most the process's threads
are, since a process fetches only what a thread is free to start (`workers.places`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from app.db import ping
from app.failure_logs import log_failure
from app.metrics import DATABASE_CUT_OFFS
from app.outages import in_one_line, is_database_outage

log = logging.getLogger(__name__)

PROBE_SECONDS = 1.0
"""How often a cut-off process asks its database whether it answers again. Once one is answered, its consumers
fetch at their next look (within `AGENTQ_BROKER_POLL_MS`). A probe takes a pooled connection, so it waits
as a claim would: for a new connection's set-up (`AGENTQ_DB_CONNECT_TIMEOUT_SECONDS`), and, on the SQLite
default, for another process's write lock (the file's busy timeout), which is what a claim waits for too."""


class DatabaseReach:
    """A process's mark of a database it cannot reach, and the probe that lifts it."""

    def __init__(self, probe: Callable[[], None] = ping, interval: float = PROBE_SECONDS) -> None:
        self._probe = probe
        self._interval = interval
        self._lock = threading.Lock()
        self._cut_off = False
        self._stopped = threading.Event()

    def cut_off(self) -> bool:
        """Read by a consumer before each fetch: a plain attribute, no lock on that path."""
        return self._cut_off

    def failed(self, error: BaseException) -> None:
        """A delivery's failure, or the pool's at boot: one that says the database is out of reach marks the
        process cut off, and starts probing it (a first probe at once, so that one lost connection costs no more
        than a probe)."""
        if not is_database_outage(error):
            return
        with self._lock:
            if self._cut_off or self._stopped.is_set():
                return
            # The probe first: a mark that no probe could lift would stop this process for good. The probe lifts
            # it under this lock, so not before it is set.
            threading.Thread(target=self._probe_until_answered, name="agentq-database-probe", daemon=True).start()
            self._cut_off = True
        DATABASE_CUT_OFFS.inc()
        log.warning("the database is out of reach (%s): this worker process takes no new run until it answers "
                    "a probe, asked every %g s", in_one_line(error), self._interval)

    def stop(self) -> None:
        """The process is stopping: no more probes (it fetches nothing anyway)."""
        self._stopped.set()

    def _probe_until_answered(self) -> None:
        """The mark is lifted however this ends: a probe answered, the process stopping (it fetches nothing
        then anyway), or a failure of the loop itself, which leaves the process fetching as if never marked
        rather than idle for good."""
        answered = False
        try:
            while not self._stopped.is_set():
                try:
                    self._probe()
                except Exception as error:
                    log_failure(log, error, "probing the database this worker process is cut off from")
                    self._stopped.wait(self._interval)
                    continue
                answered = True
                return
        finally:
            with self._lock:
                self._cut_off = False
            if answered:
                log.info("the database answers again: this worker process takes runs again")


reach = DatabaseReach()
"""This process's: marked by its deliveries' failures (`app.message_outcomes.delivery_failed`) and its pool's at
boot, read by its consumers."""
