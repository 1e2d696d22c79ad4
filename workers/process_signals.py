"""How a worker process of the group takes its stop signals: a SIGTERM sent twice is one stop, and the death of the
group's parent is a stop too (Linux's parent-death signal). Installed in each process at its boot
(`workers.middleware.WorkerServices`); the group's parent, which starts the processes again when one dies, is
`workers.group`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType

from app.logging_setup import write_to_inherited_stderr

log = logging.getLogger("agentq.worker")


REPEATED_STOP_SECONDS = 2.0


def treat_a_repeated_stop_as_one(on_first_stop: Callable[[], None]) -> None:
    """In a worker process, after Dramatiq has set its handlers: a SIGTERM that comes again within
    `REPEATED_STOP_SECONDS` of the first is the same stop, sent twice, not Dramatiq's "kill now".
    `on_first_stop` runs in the handler of the first: Dramatiq's own only flags the stop, which its main
    loop acts on at its next look, up to a second later, and the process went on fetching and starting runs
    meanwhile, to cut their calls short and hand them back when the grace ran out.

    A runner that signals the whole process group (honcho on Ctrl-C, foreman, a container stop, a
    platform that signals every process) reaches a worker process directly and through the group's parent,
    which forwards the SIGTERM it got: the second copy came a few milliseconds after the first, and the
    process left at once, its running turns neither finished nor handed back. A SIGTERM sent later still
    kills it at once, as Dramatiq means it to."""
    dramatiq_handler = signal.getsignal(signal.SIGTERM)
    if not callable(dramatiq_handler):
        return
    first: float | None = None

    def stop_once(signum: int, frame: FrameType | None) -> None:
        nonlocal first
        now = time.monotonic()
        if first is not None and now - first < REPEATED_STOP_SECONDS:
            log.info("SIGTERM again %.3f s after the first: the same stop sent twice; still stopping gracefully",
                     now - first)
            return
        if first is None:
            first = now
            if _parent_gone():
                write_to_inherited_stderr()
                log.warning("the worker group's parent is gone (killed outright?): this process stops, finishing or "
                            "handing back its runs, and writes its lines to its own stderr")
            on_first_stop()
        dramatiq_handler(signum, frame)

    signal.signal(signal.SIGTERM, stop_once)


def _parent_gone() -> bool:
    """In a worker process on Linux: its group's parent is dead or dying (the SIGTERM it got came from the
    kernel, asked for by `stop_with_the_parent`). The kernel sends that signal as the thread that forked this
    process exits, and while the parent's other threads are still being killed this process is their child
    for a moment, under the same process id: the parent's main thread is a zombie then."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return False
    if os.getppid() != parent.pid:
        return True
    try:
        with open(f"/proc/{parent.pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


PR_SET_PDEATHSIG = 1
"""Linux's `prctl` option: the signal the kernel sends a process when its parent dies."""


def stop_with_the_parent() -> None:
    """In a worker process: when the group's parent dies outright (SIGKILL, the OOM killer), the kernel sends
    this process SIGTERM, and it stops as on any SIGTERM, its runs finished or handed back. Without it the
    processes lived on as orphans that claimed nothing more (their logs went to the dead parent) yet held
    their database connections, beside the group a supervisor started again, until the database refused
    connections. Linux only; elsewhere a dead parent's workers still need their supervisor."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("could not ask to be stopped with the worker group's parent: %s", os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != parent.pid:  # the parent died between the fork and the request
        os.kill(os.getpid(), signal.SIGTERM)
