"""The worker group: Dramatiq's processes, started again when one of them dies.

Dramatiq's parent process stops the whole group as soon as one of its processes exits unexpectedly
(a SIGKILL, the OOM killer, a crash in a C extension), and then exits, leaving the restart to a
supervisor. Under a Procfile runner that stops every other process too, and on a machine without a
supervisor it leaves the queue unserved. Celery's pool replaces a dead child; here the group is
started again instead: its surviving processes have finished their turns (Dramatiq stops them with
the shutdown grace period), and the dead one's turns are taken over once their leases run out, like
those of any dead worker.

A stop asked for by a signal (SIGTERM, SIGINT) is told apart from a death by the signal itself,
not by exit codes: Python writes the number of every signal it handles to a wake-up descriptor,
whatever handler Dramatiq installed. Exit codes with which Dramatiq reports a group that cannot
start at all (its actors fail to import, its broker is unreachable) end this process instead of
looping. Between restarts the delay doubles from one second to thirty, and starts over once a
group has run for a minute.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from collections.abc import Callable
from types import FrameType

from dramatiq.cli import RET_CONNECT, RET_IMPORT, RET_PIDFILE

log = logging.getLogger("agentq.worker")

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
CANNOT_START = frozenset({RET_IMPORT, RET_CONNECT, RET_PIDFILE})
FIRST_DELAY_SECONDS = 1.0
LONGEST_DELAY_SECONDS = 30.0
STABLE_SECONDS = 60.0


class _SignalLog:
    """The signals this process received since the last look, through Python's wake-up descriptor."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for end in (self._read, self._write):
            os.set_blocking(end, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        os.register_at_fork(after_in_child=self._forget)
        self.listen()

    def _forget(self) -> None:
        """A forked worker process must not write its own signals (the SIGTERM the group's parent sends the
        survivors of a death) into the parent's log, where they would read as a stop asked of the group."""
        signal.set_wakeup_fd(-1)
        for end in (self._read, self._write):
            os.close(end)

    @staticmethod
    def listen() -> None:
        """Handle the stop signals here (only their numbers matter): between two groups Dramatiq's handler,
        still installed, would signal the old group's process ids, which may belong to others by then."""

        def noted(_signum: int, _frame: FrameType | None) -> None:
            return None

        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            signal.signal(sig, noted)

    def received(self) -> set[int]:
        numbers: set[int] = set()
        while True:
            try:
                chunk = os.read(self._read, 256)
            except BlockingIOError:
                return numbers
            if not chunk:
                return numbers
            numbers.update(chunk)

    def wait(self, seconds: float) -> set[int]:
        """Sleep up to `seconds`, waking for a signal; returns the signals received meanwhile."""
        select.select([self._read], [], [], seconds)
        return self.received()


def run_group(start: Callable[[], int], *, restart: bool = True) -> int:
    """Run the group `start` starts (Dramatiq's main) until it is stopped by a signal; returns its exit code."""
    if not restart:
        return start()
    signals = _SignalLog()
    delay, code = FIRST_DELAY_SECONDS, 0
    while True:
        # Blocked until Dramatiq has its handlers in place (it unblocks them then; so does this loop once it
        # returns): a stop arriving in between is delivered to Dramatiq, one that arrived before is in the log.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if STOP_SIGNALS & signals.received():
            return code
        started = time.monotonic()
        code = start()
        ran = time.monotonic() - started
        signals.listen()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if STOP_SIGNALS & signals.received():
            return code
        if code in CANNOT_START:
            log.critical("the worker group cannot start (exit code %s); not starting it again", code)
            return code
        if ran >= STABLE_SECONDS:
            delay = FIRST_DELAY_SECONDS
        log.error("a worker process exited unexpectedly and its group stopped (exit code %s, after %.0f s); "
                  "starting the group again in %.0f s", code, ran, delay)
        if STOP_SIGNALS & signals.wait(delay):
            return code
        delay = min(delay * 2, LONGEST_DELAY_SECONDS)
