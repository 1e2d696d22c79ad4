"""The HTTP transport of upstream calls: a finished stream gives its connection back to the pool.

The openai SDK's synchronous stream stops reading at `data: [DONE]` and closes the response before
the end of the HTTP/1.1 chunked body has been read, so httpcore cannot reuse the connection and
every turn pays a new TCP (and, against a real provider, TLS) handshake (openai-python #3440; its
maintainers prefer a fix in the transport layer). This transport watches each event stream for
`[DONE]`; when the SDK then closes it, it reads what is left of the body (each read waits at most
50 ms, and the attempt's watchdog shuts the socket if the whole drain takes longer than 0.2 s),
which lets the connection go back to the pool. A stream closed before `[DONE]` (a stop, a timeout,
a cut), or whose end does not arrive in time, is closed as before.

The watchdog of the attempt must stop watching a socket before its connection can serve another
turn, and the SDK closes the response from inside its own iteration, before the caller gets
control back: so the caller hands its watch to the stream (`guard_release`), which closes it
between the drain and the release.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import httpx2

DONE_MARKER = b"\ndata: [DONE]"
DRAIN_READ_TIMEOUT_SECONDS = 0.05
DRAIN_MAX_SECONDS = 0.2
DRAIN_MAX_EVENTS = 4


class ReleaseGuard(Protocol):
    """What watches the connection's socket (`app.attempt_watchdog.Watch`)."""

    def bound(self, seconds: float) -> None: ...

    def close(self) -> None: ...


class _ReusableEventStream(httpx2.SyncByteStream):
    def __init__(self, inner: httpx2.SyncByteStream, raw: Iterable[bytes], timeouts: dict[str, Any] | None) -> None:
        self._inner = inner
        self._raw = raw
        self._timeouts = timeouts
        self._tail = b"\n"
        self.saw_done = False
        self.guard: ReleaseGuard | None = None

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if not self.saw_done:
                window = self._tail + chunk
                self.saw_done = DONE_MARKER in window
                self._tail = window[-len(DONE_MARKER):]
            yield chunk

    def close(self) -> None:
        """Drain a finished body, stop the watch, and only then let the connection go back to the pool."""
        if self.saw_done and self._timeouts is not None:
            self._timeouts["read"] = DRAIN_READ_TIMEOUT_SECONDS
            if self.guard is not None:
                self.guard.bound(DRAIN_MAX_SECONDS)
            with contextlib.suppress(Exception):
                for _ in itertools.islice(self._raw, DRAIN_MAX_EVENTS):
                    pass
        if self.guard is not None:
            self.guard.close()
        self._inner.close()


def guard_release(response: httpx2.Response, guard: ReleaseGuard) -> None:
    """Have `guard` bound the drain of this response and be closed before its connection is released."""
    if isinstance(response.stream, _ReusableEventStream):
        response.stream.guard = guard


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


class ShardedTransport(httpx2.BaseTransport):
    """A process's upstream connections spread over several pools, each thread always using the same one.

    httpcore's pool looks at every connection it holds, under one lock, on each request and each
    release, so with hundreds of turns in flight in a process every request pays for all of them
    (`make bench`, the runs with 200 and 1,000 turns in flight). A thread keeps its shard, so the
    connection its last turn used is there for its next. The shards share one TLS context (making
    one costs a CA bundle load: a sixth of a second and 8 MB).
    """

    def __init__(self, shards: int, limits: httpx2.Limits) -> None:
        tls = httpx2.create_ssl_context()
        share = httpx2.Limits(
            max_connections=None if limits.max_connections is None else max(1, limits.max_connections // shards),
            max_keepalive_connections=None if limits.max_keepalive_connections is None
            else max(1, limits.max_keepalive_connections // shards),
            keepalive_expiry=limits.keepalive_expiry)
        self._shards = [KeepAliveTransport(verify=tls, limits=share) for _ in range(shards)]
        self._next = itertools.count()
        self._mine = threading.local()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        shard = getattr(self._mine, "shard", None)
        if shard is None:
            shard = self._mine.shard = self._shards[next(self._next) % len(self._shards)]
        return shard.handle_request(request)

    def close(self) -> None:
        for shard in self._shards:
            shard.close()
