"""Server-Sent Events framing of a turn's answer stream."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from app.answer_stream import HEARTBEAT, StreamEvent
from web import render

_LINE_BREAKS_BEYOND_SSE = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}
"""Characters `str.splitlines` breaks a line at, SSE does not (CR and LF only) and JSON leaves raw (it escapes
the control characters). Sent raw, they are valid SSE, yet a client reading the stream line by line with such a
splitter (httpx's `iter_lines`) cut the event's JSON in two; escaped, the JSON decodes to the same text."""


def _data(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False).translate(_LINE_BREAKS_BEYOND_SSE)


def sse(events: Iterable[StreamEvent], chinese: bool) -> Iterator[str]:
    """Frames events; `done` carries the stored message rendered like GET /api/messages/{id}."""
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


def closed_by_client(environ: dict[str, Any]) -> Callable[[], bool] | None:
    """A look at the request's connection that says whether its client has closed it: a peek that finds the end
    of its input (a client sends nothing more after an SSE request), one system call that never waits. gunicorn
    hands the socket over in the environ; a TLS connection (its reads are records, not bytes to peek at) or
    another server's gets no look (None), and is noticed as before, when a heartbeat's write fails."""
    connection = environ.get("gunicorn.socket")
    if not isinstance(connection, socket.socket) or isinstance(connection, ssl.SSLSocket):
        return None

    def closed() -> bool:
        try:
            return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:  # nothing to read: still open
            return False
        except OSError:  # reset by the peer
            return True

    return closed
