"""How long a client may keep an API thread waiting in the middle of a request.

gunicorn's threaded worker reads a request and writes its response on blocking sockets with no timeout: a client
that sent part of a request line, of its headers or of its body and then nothing, or one that stopped reading a
large response, held its thread for as long as it kept the connection, and a process's threads' worth of them
held up every other request, `/readyz` included. Each connection gets the kernel's receive and send timeouts
(`AGENTQ_CLIENT_TIMEOUT_SECONDS`, nginx's `client_header_timeout`, `client_body_timeout` and `send_timeout`):
a read or a write that makes no progress for that long fails, and the connection is closed. They bound each
wait, not a whole request: a slow client that keeps sending or reading is served. The kernel's, not Python's
`settimeout`, since they hold through gunicorn's switches between blocking and non-blocking, and leave the
answer stream's non-blocking looks at the socket alone (`web.sse`). A connection idle between requests waits
in the worker's poller, where no timeout applies but the keep-alive one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from werkzeug.exceptions import RequestTimeout


def timeval(seconds: float) -> bytes:
    """A `struct timeval`, as SO_RCVTIMEO and SO_SNDTIMEO take it (0: no timeout)."""
    whole, fraction = divmod(seconds, 1)
    return struct.pack("ll", int(whole), int(fraction * 1_000_000))


def bound_client_waits(client: socket.socket, seconds: float) -> None:
    """Every read and write on the connection waits `seconds` at most."""
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(seconds))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))


class _TimedBody:
    """The request's body as the server hands it over, whose read that times out is the client's 408, not the
    application's 500; the connection's reading side is shut, so that the server does not wait again on the
    rest of the body before it closes the connection."""

    def __init__(self, body: Any, connection: socket.socket | None) -> None:
        self._body, self._connection = body, connection

    def read(self, size: int = -1) -> bytes:
        return self._timed(self._body.read, size)

    def readline(self, size: int = -1) -> bytes:
        return self._timed(self._body.readline, size)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return self._timed(self._body.readlines, hint)

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _timed(self, reading: Callable[[int], Any], size: int) -> Any:
        try:
            return reading(size)
        except BlockingIOError:  # a blocking socket's receive timeout
            if self._connection is not None:
                with contextlib.suppress(OSError):
                    self._connection.shutdown(socket.SHUT_RD)
            raise RequestTimeout("The request body stopped arriving before its end.") from None


def with_timed_body(application: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """The WSGI application, reading request bodies through `_TimedBody`, so that a body that stops arriving is
    a 408 for its client rather than an error of the application's."""

    def timed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        connection = environ.get("gunicorn.socket")
        environ["wsgi.input"] = _TimedBody(environ["wsgi.input"],
                                           connection if isinstance(connection, socket.socket) else None)
        return application(environ, start_response)

    return timed
