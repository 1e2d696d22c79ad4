"""How an API process takes its connections: gunicorn 27's threaded worker, changed where its clients could
hold up every request of the process.

A new connection waits for its first bytes in the worker's poller, not on a thread; a connection the server
closes lingers for its client's close on a thread of its own (`web.lingering_close`), not on the poller's; each
read and write waits the client timeout at most (`web.client_timeouts`); a process out of file descriptors
pauses accepting instead of ending, and one at its most connections closes its oldest idle ones instead of
accepting nothing more.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from functools import partial
from typing import Any

from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

from app.config import get_settings
from app.failure_logs import OUTAGE_REPEAT_SECONDS, said_again
from web.client_timeouts import bound_client_waits
from web.lingering_close import LINGER_SECONDS, lingerer

ACCEPT_PAUSE_SECONDS = 0.5
ROOM_MADE_AT_ONCE = 16
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_LOGGER = "gunicorn.error"
"""The logger gunicorn's worker says these with, and whose repeats `said_again` counts."""


class ApiConnection(TConn):
    """gunicorn's connection, closed gracefully off the worker's event loop (`web.lingering_close`)."""

    def close(self, graceful: bool = False) -> None:
        if graceful:
            lingerer.close(self.sock)
        else:
            super().close()


class ConnectionIntake(ThreadWorker):
    """gunicorn's threaded worker, taking its connections as this module says."""

    def accept(self, listener: socket.socket) -> None:
        """gunicorn 27 hands each new connection to a thread, which waits up to 5 s for its first bytes
        before handing it back to the poller (benoitc/gunicorn#3634): connections that send nothing yet (a
        browser's preconnect, a load balancer's TCP check, a slow client) held threads, and once they held
        all of them every request of the process waited those seconds, `/readyz` included. Here a new
        connection waits in the poller, as one kept alive does, and is handed to a thread once it is
        readable, for as long as a kept-alive connection may idle."""
        try:
            client, address = listener.accept()
        except OSError as refused:
            if refused.errno in _OUT_OF_RESOURCES:
                self._pause_accepting(refused)
            elif refused.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        try:
            bound_client_waits(client, get_settings().client_timeout_seconds)
        except OSError:  # gone already
            client.close()
            return
        self.nr_conns += 1
        connection = ApiConnection(self.cfg, client, address, listener.getsockname())
        connection.timeout = time.monotonic() + (self.cfg.keepalive if self.alive else STOP_KEEPALIVE_LINGER)
        self.pending_conns.append(connection)
        self.poller.register(client, selectors.EVENT_READ, partial(self.on_pending_socket_readable, connection))

    _accepting_again = 0.0

    def _pause_accepting(self, refused: OSError) -> None:
        """gunicorn let an `accept` that found no file descriptor left (EMFILE: the process's open files at their
        limit) end the worker, dropping every request and stream it served, and its replacement the same way
        while the clients went on. Here the worker stops accepting for `ACCEPT_PAUSE_SECONDS` and serves what it
        holds meanwhile, which frees descriptors, as nginx does; the new connections wait in the listen queue."""
        if (since := said_again(_LOGGER, "accepting a connection", "pauses")) is not None:
            self.log.warning("no new connection can be taken (%s): accepting paused %s s at a time while the %s held "
                             "are served, said at most every %g s%s", refused.strerror, ACCEPT_PAUSE_SECONDS,
                             self.nr_conns, OUTAGE_REPEAT_SECONDS, since)
        self._accepting_again = time.monotonic() + ACCEPT_PAUSE_SECONDS
        self.set_accept_enabled(False)

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and time.monotonic() < self._accepting_again:
            return
        if not enabled and self.alive and self.nr_conns >= self.worker_connections and self._made_room():
            return
        super().set_accept_enabled(enabled)

    def _made_room(self) -> bool:
        """At `worker_connections` (1,000) gunicorn stops accepting until a connection closes, and connections
        that sent nothing wait up to the keep-alive time (75 s): a thousand of them, a flood or a crowd of
        preconnects, shut the process to everyone else for that long. Here the oldest idle connections, those
        that never sent a request first, then those kept alive between requests, are closed to take new ones,
        as nginx reuses its idle keep-alive connections; whether any was."""
        closed = 0
        for idle in (self.pending_conns, self.keepalived_conns):
            while idle and closed < ROOM_MADE_AT_ONCE:
                connection = idle.popleft()
                with contextlib.suppress(OSError, KeyError, ValueError):
                    self.poller.unregister(connection.sock)
                self.nr_conns -= 1
                connection.close()
                closed += 1
        if closed and (since := said_again(_LOGGER, "taking a connection at the most held", "times")) is not None:
            self.log.warning("%s connections held (worker_connections): the oldest idle ones are closed to take new "
                             "ones, said at most every %g s%s", self.worker_connections, OUTAGE_REPEAT_SECONDS, since)
        return closed > 0

    def run(self) -> None:
        """gunicorn's loop, then the connections still lingering given their time to close (`lingerer`): the
        thread that holds them ends with the process, and the kernel would reset them."""
        super().run()
        lingerer.wait_idle(LINGER_SECONDS + 1)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Connections that have sent nothing yet wait for a stop no longer than gunicorn lets kept-alive ones."""
        deadline = time.monotonic() + STOP_KEEPALIVE_LINGER
        for connection in self.pending_conns:
            connection.timeout = min(connection.timeout, deadline)
        super().handle_exit(sig, frame)
