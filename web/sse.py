"""Server-Sent Events framing of a turn's answer stream."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

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
