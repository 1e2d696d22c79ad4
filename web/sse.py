"""Server-Sent Events framing of a turn's answer stream."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from app.answer_stream import HEARTBEAT, StreamEvent
from web import render


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
        lines.append(f"data: {json.dumps(data, ensure_ascii=False)}")
        yield "\n".join(lines) + "\n\n"
