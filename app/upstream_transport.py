"""The HTTP transport of upstream calls: a finished stream gives its connection back to the pool.

The openai SDK's synchronous stream stops reading at `data: [DONE]` and closes the response before
the end of the HTTP/1.1 chunked body has been read, so httpcore cannot reuse the connection and
every turn pays a new TCP (and, against a real provider, TLS) handshake (openai-python #3440; its
maintainers prefer a fix in the transport layer). This transport watches each event stream for
`[DONE]`; when the SDK then closes it, it reads what is left of the body with a short read timeout,
which lets the connection go back to the pool. A stream closed before `[DONE]` (a stop, a timeout,
a cut), or whose end does not arrive within that timeout, is closed as before.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import httpx2

DONE_MARKER = b"data: [DONE]"
DRAIN_READ_TIMEOUT_SECONDS = 0.05
DRAIN_MAX_READS = 4


class _ReusableEventStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, raw: Iterable[bytes], timeouts: dict[str, Any] | None) -> None:
        self._inner = inner
        self._raw = raw
        self._timeouts = timeouts
        self._tail = b""
        self.saw_done = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if not self.saw_done:
                window = self._tail + chunk
                self.saw_done = DONE_MARKER in window
                self._tail = window[-len(DONE_MARKER):]
            yield chunk

    def close(self) -> None:
        if self.saw_done and self._timeouts is not None:
            self._timeouts["read"] = DRAIN_READ_TIMEOUT_SECONDS
            with contextlib.suppress(Exception):
                for _ in itertools.islice(self._raw, DRAIN_MAX_READS):
                    pass
        self._inner.close()


class KeepAliveTransport(httpx2.HTTPTransport):
    """`httpx2.HTTPTransport` whose event-stream responses are drained after `[DONE]` (see the module)."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        stream = response.stream
        raw = getattr(stream, "_httpcore_stream", None)
        content_type = response.headers.get("content-type", "")
        if raw is None or not content_type.startswith("text/event-stream") or not isinstance(
                stream, httpx2.SyncByteStream):
            return response
        timeouts = request.extensions.get("timeout")
        response.stream = _ReusableEventStream(stream, raw, timeouts if isinstance(timeouts, dict) else None)
        return response
