"""The bounds on runs no worker holds, kept by every API process: a run pending too long (`app.pending_bound`),
one past its deadline (`app.deadline_bound`) and a stopped turn whose worker died (`app.stop_bound`: once its
lease ran out with no worker to take it over, or once that worker left the workers' list) are ended with no
worker running at all, not only by the workers' deliveries and recovery sweeps."""

from __future__ import annotations

import logging
import random
import threading
import time

from app.config import get_settings
from app.deadline_bound import end_runs_past_deadline
from app.failure_logs import log_failure
from app.pending_bound import end_runs_pending_too_long
from app.stop_bound import end_stops_no_delivery_carries_out, end_stops_of_gone_holders
from app.takeover_gate import TakeoverGate

log = logging.getLogger(__name__)


def start_unheld_run_bounds() -> None:
    """`end_runs_pending_too_long`, `end_runs_past_deadline`, `end_stops_no_delivery_carries_out` and
    `end_stops_of_gone_holders` every `AGENTQ_RECOVERY_INTERVAL_SECONDS` (with jitter, so processes do not look in
    step), in a daemon thread of an API process, for the process's life: the bounds on runs no worker holds then
    hold with no worker running. Their queries read the partial index of answers in flight and the index of test
    runs by status, so a look costs seven short statements however many runs the deployment has run (and a read
    of Redis while a stopped turn is still held)."""
    threading.Thread(target=_look_every_interval, name="unheld-run-bounds", daemon=True).start()


def _look_every_interval() -> None:
    """Runs whose lease ran out (past their deadline, or stopped) are looked for once the process's `TakeoverGate`
    opens, as the recovery sweep takes leases over: a worker holding a finished answer through an outage writes
    it once the database is back, and ended first, its answer would be lost."""
    interval = get_settings().recovery_interval_seconds
    gate = TakeoverGate()
    while True:
        time.sleep(interval * random.uniform(0.5, 1.0))
        try:
            end_runs_pending_too_long()
            if (now := gate.now_if_open()) is not None:
                end_runs_past_deadline(now)
                end_stops_no_delivery_carries_out(now)
                end_stops_of_gone_holders()
        except Exception as error:
            gate.failed(error)
            log_failure(log, error, "looking for runs pending too long, past their deadline or stopped")
