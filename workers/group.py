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
whatever handler Dramatiq installed. A group whose actors fail to import (a broken deployment,
which would fail the same way again) ends this process instead of looping; anything else, an
unreachable Redis included, is started again. Between restarts the delay doubles from one second
to thirty, and starts over once a group has run for a minute. SIGHUP keeps Dramatiq's meaning:
the group stops and the command runs again from the start (between two groups, the next one
starts at once).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from dramatiq.cli import HANDLED_SIGNALS, RET_IMPORT

from app.config import get_settings

log = logging.getLogger("agentq.worker")

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
FIRST_DELAY_SECONDS = 1.0
LONGEST_DELAY_SECONDS = 30.0
STABLE_SECONDS = 60.0
CHILD_STOP_MARGIN_SECONDS = 10.0


class _SignalLog:
    """The signals this process received since the last look, through Python's wake-up descriptor."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        for end in (self._read, self._write):
            os.set_blocking(end, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        os.register_at_fork(after_in_child=self._forget)
        self.handle_here()

    def _forget(self) -> None:
        """A forked worker process must not write its own signals (the SIGTERM the group's parent sends the
        survivors of a death) into the parent's log, where they would read as a stop asked of the group,
        nor ignore them until Dramatiq gives it handlers of its own. Fork hooks are inherited, so a process
        that a worker forks in turn runs this again: by then the descriptors' numbers may belong to someone
        else, and are left alone."""
        if self._read < 0:
            return
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for end in (self._read, self._write):
            os.close(end)
        self._read = self._write = -1

    @staticmethod
    def handle_here() -> None:
        """Between two groups Dramatiq's handlers, still installed, would signal the old group's process ids,
        which may belong to others by then; these only let the number reach the log."""

        def noted(_signum: int, _frame: FrameType | None) -> None:
            return None

        for sig in HANDLED_SIGNALS:
            signal.signal(sig, noted)

    def drain(self) -> set[int]:
        numbers: set[int] = set()
        while True:
            try:
                chunk = os.read(self._read, 256)
            except BlockingIOError:
                return numbers
            if not chunk:  # only if the write end were closed: never loop on an ended pipe
                return numbers
            numbers.update(chunk)

    def wait(self, seconds: float) -> set[int]:
        """Sleep up to `seconds`, but not through a stop: returns the signals received meanwhile."""
        select.select([self._read], [], [], seconds)
        return self.drain()


def preload(actors_module: str) -> None:
    """Import the actors' module and the HTTP stack in the group's parent, before it forks its processes: each
    process inherits them (copy-on-write) instead of importing them itself, about 1.5 s of CPU a process at
    every start and restart of the group, paid by all of them at once on a machine of two cores. Nothing is
    connected here; each process drops whatever pools it inherited when it boots
    (`app.worker_services.after_fork`). A module that fails to import is left to the processes, which fail
    the same way and report it as Dramatiq does (the group then ends: `run_group`). What was imported is
    frozen out of the collector's view here, as each process freezes what it built (`app.heap`): a process's
    first full collection, at its boot, then walks only its own objects, and never writes to the pages it
    shares with its parent."""
    try:
        importlib.import_module(actors_module)
    except Exception:
        log.debug("preloading %s failed; each worker process imports it itself", actors_module, exc_info=True)
        return
    from app import upstream_clients
    from app.heap import freeze_after_boot

    upstream_clients.warm_up()
    freeze_after_boot()


ACTORS_MODULE = "workers.actors"


def serve_workers(processes: int, threads: int, queues: list[str] | None, *, restart: bool) -> int:
    """Run Dramatiq's worker processes on agentq's actors until an operator stops them (`run_group`)."""
    import dramatiq.worker
    from dramatiq.cli import main as dramatiq_main
    from dramatiq.cli import make_argument_parser

    from app.metrics_files import fold_ended_processes

    # A process takes no more runs than it has threads (each queue's consumer counts the places the others
    # took: `workers.places`). Dramatiq reads `dramatiq_queue_prefetch` into this global when
    # `dramatiq.worker` is first imported, which the command's parser has already done, so the environment
    # variable cannot be used here; without it Dramatiq prefetches twice the threads.
    dramatiq.worker.QUEUE_PREFETCH = dramatiq.worker.QUEUE_PREFETCH or threads
    preload(ACTORS_MODULE)
    argv = [ACTORS_MODULE, "--processes", str(processes), "--threads", str(threads),
            "--worker-shutdown-timeout", str(int(get_settings().shutdown_grace_seconds * 1000))]
    if queues:
        argv += ["--queues", *queues]

    def start_group() -> int:
        fold_ended_processes()  # the counter files of the group's processes that ended, as it starts again
        return int(dramatiq_main(make_argument_parser().parse_args(argv)) or 0)

    return run_group(start_group, restart=restart)


def run_group(start: Callable[[], int], *, restart: bool = True) -> int:
    """Run the group `start` starts (Dramatiq's main) until an operator's signal stops it, starting it again
    whenever it returns for any other reason, since nothing else would. Returns the exit code of the stop,
    or of a group that cannot start.

    Without `restart` the group runs once, as Dramatiq's own command does, for a supervisor that restarts
    the command itself."""
    if not restart:
        return start()
    signals = _SignalLog()
    delay = FIRST_DELAY_SECONDS
    while True:
        # Dramatiq blocks these itself only once it is under way; blocked from here, one that comes before
        # its handlers are in place waits for them, and one that came before this line is in the log.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        if STOP_SIGNALS & signals.drain():
            return 0
        started, path = time.monotonic(), list(sys.path)
        try:
            code = start()
        except BaseException:
            _stop_children()
            raise
        finally:
            signals.handle_here()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            sys.path[:] = path
        ran = time.monotonic() - started
        if STOP_SIGNALS & signals.drain():
            return code
        if code == RET_IMPORT:
            log.critical("the worker group cannot start: its actors fail to import (exit code %s); "
                         "not starting it again", code)
            return code
        if ran >= STABLE_SECONDS:
            delay = FIRST_DELAY_SECONDS
        log.error("a worker process exited unexpectedly and its group stopped after %.0f s (Dramatiq's CRITICAL "
                  "line before this names the process and its exit code, -9 for a SIGKILL; the group's is %s); "
                  "starting the group again in %.0f s", ran, code, delay)
        if STOP_SIGNALS & signals.wait(delay):
            return 0
        delay = min(delay * 2, LONGEST_DELAY_SECONDS)


def _stop_children() -> None:
    """Dramatiq's main failed half-way (a fork refused for want of memory): stop the processes it started,
    which would otherwise keep this one from exiting. Each finishes its turns within the shutdown grace
    Dramatiq was given, as at any stop."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    within = get_settings().shutdown_grace_seconds + CHILD_STOP_MARGIN_SECONDS
    for child in children:
        child.join(within)
        if child.is_alive():
            child.kill()
