"""The restart rule of `workers.group.run_group`, each case in a fresh Python process of its own (the rule
installs signal handlers and a wake-up descriptor, which a test process should not keep).

Starting real groups, killing one of their processes and stopping them with SIGTERM is in
tests/test_recovery.py and tests/test_chaos.py; here the group is a function whose exit codes and
signals each case chooses, so the cases a real group rarely shows can be asserted exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support import ROOT

PRELUDE = """
import os, signal, sys, time
from workers.group import run_group
starts = []
def log(code):
    starts.append(code)
    print("start", code, flush=True)
    return code
"""


def run(body: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_group_whose_actors_fail_to_import_is_not_started_again() -> None:
    done = run("sys.exit(run_group(lambda: log(2)))")  # Dramatiq's RET_IMPORT
    assert (done.returncode, done.stdout.split("\n").count("start 2")) == (2, 1)
    assert "cannot start" in done.stderr


def test_a_group_that_died_is_started_again_until_a_stop_signal() -> None:
    done = run("""
        def start():
            if len(starts) == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # the operator's stop, while the second group runs
                return log(0)
            return log(1)  # a process died: Dramatiq stopped the group
        sys.exit(run_group(start))
    """)
    assert done.returncode == 0
    assert done.stdout.split() == ["start", "1", "start", "0"]
    assert done.stderr.count("starting the group again in 1 s") == 1


def test_a_stop_during_the_delay_ends_the_wait_at_once_as_a_clean_stop() -> None:
    done = run("""
        import threading
        def start():
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            return log(1)
        began = time.monotonic()
        code = run_group(start)
        print("waited", round(time.monotonic() - began, 1), flush=True)
        sys.exit(code)
    """)
    assert done.returncode == 0
    assert done.stdout.split()[:2] == ["start", "1"] and done.stdout.count("start") == 1
    assert float(done.stdout.split()[-1]) < 1.0


def test_without_restart_the_group_runs_once_as_dramatiq_would() -> None:
    done = run("sys.exit(run_group(lambda: log(1), restart=False))")
    assert (done.returncode, done.stdout.split()) == (1, ["start", "1"])


def test_a_group_that_fails_to_start_is_not_left_running() -> None:
    """Dramatiq's main raising half-way (a fork refused) must not leave its processes holding this one."""
    done = run("""
        import multiprocessing
        def serve():  # as a Dramatiq worker process does, once it has its handlers
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            time.sleep(600)
        def start():
            multiprocessing.Process(target=serve).start()
            raise MemoryError("fork refused")
        try:
            run_group(start)
        except MemoryError:
            print("left", len(multiprocessing.active_children()), flush=True)
    """)
    assert (done.returncode, done.stdout.split()) == (0, ["left", "0"])


def test_a_worker_process_takes_a_repeated_stop_for_one_from_its_boot_on() -> None:
    """Dramatiq sets its SIGTERM handler (a second SIGTERM: "kill now") before the process's boot hook; the
    filter that takes a copy sent within 2 s for the same stop was installed only once the worker threads
    ran, after the database pool opened, so a stop sent to the whole process group in that time killed the
    process with its first runs in flight. It is in place when the boot hook returns."""
    done = run("""
        stops = []
        def dramatiq_handler(signum, frame):  # what Dramatiq's worker process installs
            stops.append(signum)
        signal.signal(signal.SIGTERM, dramatiq_handler)
        from workers.middleware import WorkerServices
        WorkerServices().after_process_boot(None)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        print("stops", len(stops), flush=True)
    """)
    assert (done.returncode, done.stdout.split()) == (0, ["stops", "1"]), done.stderr
    assert "the same stop sent twice" in done.stderr
