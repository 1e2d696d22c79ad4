"""Closing a client's connection gracefully without holding up the API process's event loop.

A connection the server closes (a `Connection: close` request, HTTP/1.0, a refused body) is closed as RFC 9112
9.6 asks: the server sends its FIN, then reads and drops what the client still sends until the client closes
too, so that request bytes left unread do not make the kernel answer with a reset that could cut the response
short. gunicorn 27 does this (`util.close_graceful`: up to 2 s and 64 KiB) on its worker's event loop thread,
where it waits on the client: a client that kept its socket open stopped every accept and every dispatch of
the process for 2 s, one such connection after another. Here one thread a process lingers on all of them at
once, with a selector, as nginx's `lingering_close` does in its event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import cast

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
"""gunicorn's own: how long the client is given to close its side."""
LINGER_DRAIN_BYTES = 64 * 1024
"""gunicorn's own: the most read from a client that goes on sending; past it, the connection is closed."""
MOST_LINGERING = 4096
"""Connections closed at once past this many lingering, or past an eighth of the process's open files
(`most_lingering`): a client that never closes, many times over, cannot use the process's file descriptors
up; such a client's last response may then be cut short by a reset."""


def most_lingering() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MOST_LINGERING if soft == resource.RLIM_INFINITY else min(MOST_LINGERING, max(soft // 8, 16))


@dataclass
class _Lingering:
    deadline: float
    drained: int = 0
    done: bool = False


class Lingerer:
    """One thread a process that reads lingering connections until each is closed by its client, drained past
    `LINGER_DRAIN_BYTES` or past its `LINGER_SECONDS`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._arrivals: list[socket.socket] = []
        self._count = 0
        self._most = MOST_LINGERING
        self._pid = 0
        self._wake: tuple[int, int] = (-1, -1)

    def close(self, client: socket.socket) -> None:
        """Send the FIN now, and close the socket once the client has closed or its time is up. Never raises
        (gunicorn counts a connection closed before it calls this, and counts it again if this raises): what
        cannot linger is closed at once."""
        try:
            client.shutdown(socket.SHUT_WR)
            client.setblocking(False)
        except OSError:
            client.close()
            return
        with self._lock:
            if (self._pid != os.getpid() and not self._started()) or self._count >= self._most:
                client.close()
                return
            self._count += 1
            self._arrivals.append(client)
        with contextlib.suppress(OSError):  # the pipe full: a wake is already waiting
            os.write(self._wake[1], b"\0")

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection lingers (a worker stopping: its daemon thread dies with it, and the kernel
        would reset what it still held); whether none does."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0 or self._pid != os.getpid(), timeout)

    def _started(self) -> bool:
        """Start this process's thread (a worker forked after an earlier start inherits none, only the state);
        whether it runs. One that cannot start now (no file descriptor left) is tried again at the next close."""
        try:
            wake = os.pipe()
        except OSError:
            log.warning("lingering close: no pipe for its thread (%s open files at most); connections are closed "
                        "at once", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
            return False
        try:
            for end in wake:
                os.set_blocking(end, False)
            threading.Thread(target=self._run, args=(wake[0],), name="lingering-close", daemon=True).start()
        except (OSError, RuntimeError):
            log.exception("lingering close: its thread could not start; connections are closed at once")
            for end in wake:
                os.close(end)
            return False
        self._pid, self._wake, self._arrivals, self._count, self._most = os.getpid(), wake, [], 0, most_lingering()
        return True

    def _run(self, wake: int) -> None:
        selector = selectors.DefaultSelector()
        selector.register(wake, selectors.EVENT_READ, None)
        by_deadline: deque[selectors.SelectorKey] = deque()  # as they came, which is their deadlines' order
        while True:
            try:
                self._turn(selector, wake, by_deadline)
            except Exception:  # the thread must outlive any one connection's surprise, or every later one leaks
                log.exception("lingering close: a connection could not be closed gracefully")

    def _turn(self, selector: selectors.BaseSelector, wake: int, by_deadline: deque[selectors.SelectorKey]) -> None:
        timeout = max(by_deadline[0].data.deadline - time.monotonic(), 0) if by_deadline else None
        for key, _events in selector.select(timeout):
            if key.data is None:
                by_deadline.extend(self._take_arrivals(selector, wake))
            elif self._read_out(cast(socket.socket, key.fileobj), key.data):
                self._finish(selector, key)
        now = time.monotonic()  # the front left is then neither done with nor due
        while by_deadline and (by_deadline[0].data.done or by_deadline[0].data.deadline <= now):
            key = by_deadline.popleft()
            if not key.data.done:
                self._finish(selector, key)

    def _take_arrivals(self, selector: selectors.BaseSelector, wake: int) -> list[selectors.SelectorKey]:
        with contextlib.suppress(BlockingIOError):
            while os.read(wake, 4096):
                pass
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        deadline = time.monotonic() + LINGER_SECONDS
        taken = []
        for client in arrivals:
            try:
                taken.append(selector.register(client, selectors.EVENT_READ, _Lingering(deadline)))
            except (OSError, ValueError):
                self._close(client)
        return taken

    @staticmethod
    def _read_out(client: socket.socket, state: _Lingering) -> bool:
        """Drop what the client sent; whether the connection is done with (closed by the client, failed, or
        drained past the limit)."""
        while state.drained < LINGER_DRAIN_BYTES:
            try:
                data = client.recv(4096)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            state.drained += len(data)
        return True

    def _finish(self, selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        key.data.done = True
        selector.unregister(key.fileobj)
        self._close(cast(socket.socket, key.fileobj))

    def _close(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            client.close()
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()


lingerer = Lingerer()
