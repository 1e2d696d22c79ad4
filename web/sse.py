"""Server-Sent Events framing of a turn's answer stream."""

from __future__ import annotations

import contextlib
import json
import logging
import select
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from app.answer_stream import HEARTBEAT, StreamEvent
from app.config import get_settings
from web import render
from web.client_timeouts import timeval

log = logging.getLogger(__name__)

_LINE_BREAKS_BEYOND_SSE = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}
"""Characters `str.splitlines` breaks a line at, SSE does not (CR and LF only) and JSON leaves raw (it escapes
the control characters). Sent raw, they are valid SSE, yet a client reading the stream line by line with such a
splitter (httpx's `iter_lines`) cut the event's JSON in two; escaped, the JSON decodes to the same text."""


def _data(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS_BEYOND_SSE)


_PIECE_BYTES = 4096
"""The most the server writes at once. A TCP socket reported writable has room for a third of its send buffer
(16 KiB at the least by Linux's defaults), so a piece of this size goes out without waiting, and an event
larger than that (a `done` carrying a long answer) goes out in pieces, each looked at first; one that waits
anyway meets the socket's timeout (`ClientConnection`)."""


def sse(events: Iterable[StreamEvent], chinese: bool, connection: ClientConnection | None) -> Iterator[bytes]:
    """Frames events; `done` carries the stored message rendered like GET /api/messages/{id}. Each piece is
    written once the connection takes writes; one that does not ends the response (`ClientConnection`)."""
    if connection is not None:
        connection.stream_started()
    try:
        for frame in _frames(events, chinese):
            data = frame.encode()
            for start in range(0, len(data), _PIECE_BYTES):
                if connection is not None and not connection.takes_writes():
                    connection.cut()
                    return
                yield data[start:start + _PIECE_BYTES]
    finally:
        if connection is not None:
            connection.stream_ended()


def _frames(events: Iterable[StreamEvent], chinese: bool) -> Iterator[str]:
    yield "retry: 1000\n\n"
    for event in events:
        if event.event == HEARTBEAT:
            yield ": keep-alive\n\n"
            continue
        data = render.message(event.data, chinese) if event.event == "done" else event.data
        lines = [f"event: {event.event}"]
        if event.id is not None:
            lines.append(f"id: {event.id}")
        lines.append(f"data: {_data(data)}")
        yield "\n".join(lines) + "\n\n"


class ClientConnection:
    """The request's connection, which gunicorn hands over in the environ: whether its client closed it, and
    whether it takes what the server writes.

    A client that stops reading without closing (a suspended laptop, a stuck proxy, a reader that means harm)
    left the thread serving its stream blocked in a write once the socket's buffers were full, for as long as
    the client stayed, and held one of its user's stream slots: nothing ended it, the stream's deadline and the
    server's stop included, since both are looked at between writes. Like nginx's `send_timeout`, a write
    that cannot start within `AGENTQ_STREAM_WRITE_TIMEOUT_SECONDS` ends the response."""

    def __init__(self, connection: socket.socket, write_timeout: float) -> None:
        self._socket = connection
        self._write_timeout = write_timeout
        self._writable = select.poll()
        self._writable.register(connection.fileno(), select.POLLOUT)
        self._send_timeout = connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, len(timeval(0)))

    @classmethod
    def of(cls, environ: dict[str, Any]) -> ClientConnection | None:
        """The connection of a request gunicorn serves; None under another server."""
        connection = environ.get("gunicorn.socket")
        if not isinstance(connection, socket.socket):
            return None
        return cls(connection, get_settings().stream_write_timeout_seconds)

    def closed_look(self) -> Callable[[], bool] | None:
        """A look that says whether the client has closed the connection: a peek that finds the end of its
        input (a client sends nothing more after an SSE request), one system call that never waits. A TLS
        connection (its reads are records, not bytes to peek at) gets none (None), and is noticed as before,
        when a write fails."""
        return None if isinstance(self._socket, ssl.SSLSocket) else self._closed

    def _closed(self) -> bool:
        try:
            return self._socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # nothing to read: still open
            return False
        except OSError:  # reset by the peer
            return True

    def takes_writes(self) -> bool:
        """Whether the socket has room for a write within the write timeout (at once, unless its client has
        stopped reading). One system call that returns as soon as there is room."""
        return bool(self._writable.poll(self._write_timeout * 1000))

    def stream_started(self) -> None:
        """The backstop for a piece larger than the room a writable socket is sure to have: the kernel's timeout on a
        send, so that such a write fails in gunicorn's hands (which closes the connection) rather than waiting for
        the connection's own timeout (`web.client_timeouts`). Python's own `settimeout` would also make the peek of
        `closed_look` wait. Set as the stream starts, so that a stream refused before (a 404, a 429) leaves the
        connection as it was."""
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self._write_timeout))

    def stream_ended(self) -> None:
        """Gives a connection kept alive after the stream its send timeout of before (`web.client_timeouts`)."""
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, self._send_timeout)

    def cut(self) -> None:
        """Ends the connection of a client that stopped reading: gunicorn's last write then fails at once, as to
        a client that closed, instead of waiting for room that never comes."""
        log.info("an answer stream's client took nothing for %s s; its connection is closed", self._write_timeout)
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
