"""Hard bounds on upstream attempts: shut an attempt's socket at its deadline or when its turn is stopped.

A read blocked on a stalled stream, or on response headers that do not come, wakes at once when its
socket is shut down, which the read timeout alone cannot do for a stream that trickles. The watch
starts before the request is sent; the upstream transport attaches the request's socket to it when
it writes the request (`Watch.attach`), so a stop or the deadline ends the wait for the response
headers as well as the stream, and a watch that fired before its socket was known shuts it then.

One thread per process watches every attempt in flight (a thread per attempt costs a start and its
own wake-ups for each of hundreds of turns held at once); it wakes at the nearest deadline and at
least every `TICK_SECONDS` to look at the stop flags, and a new attempt wakes it only when its
deadline comes before that (each wake looks at every attempt in flight, so waking for each new one
cost O(attempts) per turn). Shutting a socket, detaching it and ending the watch take the same
lock, so a socket is never shut after it was detached or its watch closed; the upstream transport
detaches a socket before it lets the connection go back to the pool for another turn or closes it
(`app.upstream_transport`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

from app.failure_kinds import FailureKind

TICK_SECONDS = 0.1


class Watch:
    """One attempt under watch; `fired` tells why its socket was shut (a timeout or a stop)."""

    __slots__ = ("_watchdog", "deadline", "fired", "requested", "sock", "stop")

    def __init__(self, watchdog: _Watchdog, deadline: float, stop: threading.Event) -> None:
        self._watchdog = watchdog
        self.deadline = deadline
        self.stop = stop
        self.sock: socket.socket | None = None
        self.fired: FailureKind | None = None
        self.requested = False
        """A request of the attempt's reached a connection: until then the provider has nothing to bill."""

    def attach(self, sock: socket.socket | None) -> None:
        """The attempt's request is being written to `sock`: watch it (shut it now if the watch already fired).
        A request is written in several pieces; once its socket is attached the others need not take the lock
        every attempt of the process shares (a fire since then has shut that socket already)."""
        if sock is not None:
            self.requested = True
        if sock is None or self.sock is not sock:
            self._watchdog.attach(self, sock)

    def detach(self, sock: socket.socket | None) -> None:
        """`sock`'s connection is about to be released or closed: never shut it from now on. The attempt is
        still watched (a redirect's next request attaches its own socket; a fire is still reported)."""
        self._watchdog.detach(self, sock)

    def close(self) -> None:
        """The attempt ended: from now on its socket is left alone. Safe to call more than once."""
        self._watchdog.forget(self)

    def bound(self, seconds: float) -> None:
        """Shut the socket at the latest `seconds` from now (the end of a finished stream is being read)."""
        self._watchdog.advance(self, time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once past): the longest a step without a socket to shut,
        a name lookup or a connect, may take."""
        return self.deadline - time.monotonic()

    def ended(self) -> bool:
        """The attempt was stopped or ran out of time: nothing more should be started for it."""
        return self.fired is not None or self.stop.is_set() or self.remaining() <= 0


class _Watchdog:
    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        """A forked child starts with no watches, a free lock, and starts its own thread when needed."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._wakes_at = 0.0

    def watch(self, deadline: float, stop: threading.Event) -> Watch:
        entry = Watch(self, deadline, stop)
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                thread = threading.Thread(target=self._run, name="attempt-watchdog", daemon=True)
                thread.start()
                self._thread, self._pid = thread, os.getpid()
            self._watches.add(entry)
            if deadline < self._wakes_at:
                self._changed.notify()
        return entry

    def attach(self, entry: Watch, sock: socket.socket | None) -> None:
        with self._lock:
            if entry in self._watches:
                entry.sock = sock
            elif entry.fired is not None and sock is not None:
                _shut(sock)

    def detach(self, entry: Watch, sock: socket.socket | None) -> None:
        with self._lock:
            if entry.sock is sock:
                entry.sock = None

    def forget(self, entry: Watch) -> None:
        with self._lock:
            self._watches.discard(entry)

    def advance(self, entry: Watch, deadline: float) -> None:
        with self._lock:
            if entry in self._watches and deadline < entry.deadline:
                entry.deadline = deadline
                if deadline < self._wakes_at:
                    self._changed.notify()

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                nearest = now + TICK_SECONDS
                for entry in list(self._watches):
                    if entry.stop.is_set():
                        self._fire(entry, FailureKind.CANCELLED)
                    elif entry.deadline <= now:
                        self._fire(entry, FailureKind.TIMEOUT)
                    else:
                        nearest = min(nearest, entry.deadline)
                self._wakes_at = nearest if self._watches else float("inf")
                self._changed.wait(max(nearest - now, 0.001) if self._watches else None)

    def _fire(self, entry: Watch, reason: FailureKind) -> None:
        self._watches.discard(entry)
        entry.fired = reason
        if entry.sock is not None:
            _shut(entry.sock)


def _shut(sock: socket.socket) -> None:
    """Shut the TCP socket under a TLS one too, without `SSLSocket.shutdown`, which drops the TLS object
    under a reader in another thread (it would fail with an AttributeError instead of seeing the end)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


_watchdog = _Watchdog()


def watch_attempt(deadline: float, stop: threading.Event) -> Watch:
    """Watch an attempt, from before its request is sent, until `Watch.close`."""
    return _watchdog.watch(deadline, stop)
