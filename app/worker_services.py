"""What a worker process runs besides its actors: its pools, the lease keeper's companions, its presence, and its
stop (what happens to each delivery and to a message that dies is `app.message_outcomes`)."""

from __future__ import annotations

import logging
import time

from app import metrics, outbox, upstream_clients
from app.database_reach import reach
from app.db import dispose_engines, open_pool
from app.dispatch import Delivered
from app.failure_logs import log_failure, warn_of
from app.heap import freeze_after_boot
from app.leases import keeper
from app.recovery import RecoveryLoop
from app.redis_client import reset_redis
from app.run_kinds import run_of
from app.stop_requests import stopped_turns
from app.worker_presence import PresenceLoop, WorkerState

log = logging.getLogger(__name__)

_recovery: RecoveryLoop | None = None
_presence: PresenceLoop | None = None


class StopFlag:
    """A flag set once and only looked at. Not a `threading.Event`: it is set from the SIGTERM handler, which
    runs on the main thread between two bytecodes, possibly of that same thread's `Event.set` (a stop begun
    by another signal), whose lock it would then wait for for ever. Nothing waits on it."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


draining = StopFlag()
"""Set when this worker process starts shutting down: its consumers fetch no new message
(`workers.consumer.RefillingConsumer`) and a run that still reaches a thread is handed back."""


def state_now() -> WorkerState:
    """What this process does: it takes no new run once it is stopping, nor while it is cut off from its database
    (`app.database_reach`). Its consumers ask (`takes_new_runs`), and its presence says it (`app.worker_presence`)."""
    if draining.is_set():
        return WorkerState.STOPPING
    return WorkerState.DATABASE_CUT_OFF if reach.cut_off() else WorkerState.TAKING_RUNS


def takes_new_runs() -> bool:
    """Whether this process's work-queue consumers fetch."""
    return state_now() is WorkerState.TAKING_RUNS


def moves_retries() -> bool:
    """Whether this process's delay-queue consumers fetch: until it is stopping."""
    return not draining.is_set()


def after_fork() -> None:
    dispose_engines()
    reset_redis()
    upstream_clients.reset_clients()
    metrics.close_inherited_counters_server()


def open_pools(threads: int) -> None:
    """Before the consumers start: pools sized to the threads and opened, and, were the database out of reach,
    the process marked cut off before its first fetch."""
    upstream_clients.size_pools(threads)
    _warm_up()


def start(threads: int) -> None:
    global _recovery, _presence
    keeper.cancel_check = stopped_turns
    if _recovery is None:
        _recovery = RecoveryLoop()
        _recovery.start()
    if _presence is None:
        _presence = PresenceLoop(threads, state_now, keeper.held_count)
        _presence.start()
    freeze_after_boot()


def leave() -> None:
    """The process's last step: off the workers' list at once, rather than once its presence expires."""
    if _presence is not None:
        _presence.stop()


def _warm_up() -> None:
    """Pay for the database pool and the HTTP stack's imports before the worker says it is ready,
    not in the first turns it runs (which would otherwise be slower than every later one). A process that
    boots while its database is out of reach takes no run until it answers (`app.database_reach`)."""
    try:
        open_pool()
    except Exception as error:
        log_failure(log, error, "opening the database connections at boot (they open on first use)")
        reach.failed(error)
    upstream_clients.warm_up()


def stop_fetching() -> None:
    """Called in the SIGTERM handler, at once (`workers.process_signals.treat_a_repeated_stop_as_one`): no new fetch,
    and no new run starts in this process. Only sets a flag (`StopFlag`): a handler runs between two bytecodes
    of the main thread, which must not be made to wait for anything."""
    draining.set()


def stop() -> None:
    """The worker is shutting down: no more sweeps, no new fetch, and no new run starts in this process."""
    stop_fetching()
    reach.stop()
    if _recovery is not None:
        _recovery.stop()


RECORDING_SECONDS = 1.0
"""How long a leaving process waits for the runs still held as the shutdown grace ran out to record what they
did: those handed back, the model calls they made (the provider bills a call cut short too: their attempts
were stopped as they were handed back, and each records them on its own once its settlement is refused,
which takes a tick of the watchdog and a write); those whose calls were over, or ended on their own as they
were handed back (their leases taken back: `app.leases.LeaseKeeper.ending`), their ends."""


def hand_back_unfinished() -> None:
    """The worker threads had the shutdown grace to finish their runs: those still calling a model are given
    up and sent again, once their stopped calls have ended, for another worker to take over at once (their
    leases would otherwise hold them for up to `AGENTQ_LEASE_SECONDS` after this process is gone); those already
    writing their ends, or whose answers came back as they were stopped, are left to finish. All of it within
    `RECORDING_SECONDS` before the process leaves."""
    leaves_at = time.monotonic() + RECORDING_SECONDS
    try:
        handed = keeper.hand_back(sent_within=RECORDING_SECONDS)
    except Exception as exc:
        warn_of(log, exc, "could not give up the leases of the runs still in flight; they run out by themselves")
        return
    for kind, ident in keeper.handed_back_to_send(max(leaves_at - time.monotonic(), 0.0)):
        if outbox.send(kind, ident, None):
            log.warning("%s %s was still running when the shutdown grace ran out; handed to another worker",
                        kind.label, ident)
        else:
            log.warning("%s %s was still running when the shutdown grace ran out; its lease is given up, and the "
                        "recovery sweep sends it again once Redis takes it", kind.label, ident)
    for kind, ident in handed.ending:
        log.info("%s %s had ended its model calls when the shutdown grace ran out; waiting for its end to be written",
                 kind.label, ident)
    if not keeper.wait_until_released(max(leaves_at - time.monotonic(), 0.0)):
        log.warning("runs still held at the end of the shutdown grace did not record their model calls or ends "
                    "within %ss; the process leaves without waiting for them", RECORDING_SECONDS)


def hand_back_if_draining(message: Delivered) -> bool:
    """A run that reaches an idle thread after SIGTERM is sent again, for another worker, instead of
    starting here; False when this process is not stopping, the message is not a run, or it cannot be sent."""
    if not draining.is_set():
        return False
    run = run_of(message.actor_name, message.args)
    if run is None:
        return False
    kind, ident = run
    return kind.send(ident, None)
