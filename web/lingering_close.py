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
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import cast

log = logging.getLogger(__name__)

LINGER_SECONDS = 2.0
"""gunicorn's own: how long the client is given to close its side."""
LINGER_DRAIN_BYTES = 64 * 1024
"""gunicorn's own: the most read from a client that goes on sending; past it, the connection is closed."""
MOST_LINGERING = 4096
"""Connections closed at once past this many lingering (a client that never closes, many times over): file
descriptors stay bounded, and such a client's last response may be cut short by a reset."""


@dataclass
class _Lingering:
    deadline: float
    drained: int = 0


class Lingerer:
    """One thread a process that reads lingering connections until each is closed by its client, drained past
    `LINGER_DRAIN_BYTES` or past its `LINGER_SECONDS`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._arrivals: list[socket.socket] = []
        self._count = 0
        self._pid = 0
        self._wake: tuple[int, int] = (-1, -1)

    def close(self, client: socket.socket) -> None:
        """Send the FIN now, and close the socket once the client has closed or its time is up."""
        try:
            client.shutdown(socket.SHUT_WR)
            client.setblocking(False)
        except OSError:
            client.close()
            return
        with self._lock:
            if self._pid != os.getpid():
                self._start()
            if self._count >= MOST_LINGERING:
                client.close()
                return
            self._count += 1
            self._arrivals.append(client)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake[1], b"\0")

    def _start(self) -> None:
        """In this process: a worker forked after an earlier start inherits no thread, only its state."""
        self._pid, self._arrivals, self._count = os.getpid(), [], 0
        self._wake = os.pipe()
        os.set_blocking(self._wake[0], False)
        os.set_blocking(self._wake[1], False)
        threading.Thread(target=self._run, args=(self._wake[0],), name="lingering-close", daemon=True).start()

    def _run(self, wake: int) -> None:
        selector = selectors.DefaultSelector()
        selector.register(wake, selectors.EVENT_READ, None)
        while True:
            try:
                self._turn(selector, wake)
            except Exception:  # the thread must outlive any one connection's surprise, or every later one leaks
                log.exception("lingering close: a connection could not be closed gracefully")

    def _turn(self, selector: selectors.BaseSelector, wake: int) -> None:
        soonest = min((key.data.deadline for key in _lingering(selector)), default=None)
        for key, _events in selector.select(None if soonest is None else max(soonest - time.monotonic(), 0)):
            if key.data is None:
                self._take_arrivals(selector, wake)
            elif self._read_out(cast(socket.socket, key.fileobj), key.data):
                self._finish(selector, key)
        now = time.monotonic()
        for key in _lingering(selector):
            if key.data.deadline <= now:
                self._finish(selector, key)

    def _take_arrivals(self, selector: selectors.BaseSelector, wake: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(wake, 4096):
                pass
        with self._lock:
            arrivals, self._arrivals = self._arrivals, []
        deadline = time.monotonic() + LINGER_SECONDS
        for client in arrivals:
            try:
                selector.register(client, selectors.EVENT_READ, _Lingering(deadline))
            except (OSError, ValueError):
                self._close(client)

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
        selector.unregister(key.fileobj)
        self._close(cast(socket.socket, key.fileobj))

    def _close(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            client.close()
        with self._lock:
            self._count -= 1


def _lingering(selector: selectors.BaseSelector) -> list[selectors.SelectorKey]:
    """The connections registered (not the wake pipe), as a list: finishing one changes the selector's map."""
    return [key for key in selector.get_map().values() if key.data is not None]


lingerer = Lingerer()
