"""The HTTP transport of upstream calls: a finished stream gives its connection back to the pool.

The openai SDK's synchronous stream stops reading at `data: [DONE]` and closes the response before
the end of the HTTP/1.1 chunked body has been read, so httpcore cannot reuse the connection and
every turn pays a new TCP (and, against a real provider, TLS) handshake (openai-python #3440; its
maintainers prefer a fix in the transport layer). This transport watches each event stream for
`[DONE]`; when the SDK then closes it, it reads what is left of the body (each read waits at most
50 ms, and the attempt's watchdog shuts the socket if the whole drain takes longer than 0.2 s),
which lets the connection go back to the pool. A stream closed before `[DONE]` (a stop, a timeout,
a cut), or whose end does not arrive in time, is closed as before.

An attempt's watchdog (`app.attempt_watchdog`) needs the socket of the request it bounds from the
moment the request is sent, before any response exists, so that a stop or the deadline can end a
wait for the response headers too. The caller marks the request its thread sends as an attempt's
(`guarding`); the connection's stream, when that request is written to it, hands its socket to the
attempt's guard (a redirect's second request hands over its own). The guard must let go of the socket
before its connection can serve another turn or its file descriptor be closed and reused, and the SDK
closes the response from inside its own iteration, before the caller gets control back: so the
response detaches the socket itself, between the drain and the release, and so does the connection's
stream before it closes the socket. The guard keeps watching the attempt until its caller closes it.

Before a new connection has a socket there is nothing to shut: its name lookup, TCP connect and TLS handshake
are bounded by the attempt instead (`app.upstream_connect`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore2
import httpx2
from httpcore2._backends.sync import SyncStream  # httpcore's socket stream; not re-exported (pinned <2.17)

from app.upstream_connect import AttemptGuard, addresses, connect, give_up_at, handshake

DONE_MARKER = b"\ndata: [DONE]"
DRAIN_READ_TIMEOUT_SECONDS = 0.05
DRAIN_MAX_SECONDS = 0.2
DRAIN_MAX_EVENTS = 4


_sending = threading.local()


@contextlib.contextmanager
def guarding(guard: AttemptGuard) -> Iterator[None]:
    """The request this thread sends inside the block is `guard`'s attempt: its socket is handed to the
    guard when the request is written, and taken back before the connection is released or closed."""
    _sending.guard = guard
    try:
        yield
    finally:
        _sending.guard = None


def _current_guard() -> AttemptGuard | None:
    return getattr(_sending, "guard", None)


class _AttemptSocketStream(httpcore2.NetworkStream):
    """A connection's byte stream that hands its socket to the attempt whose request is written to it."""

    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner
        self._sock: socket.socket | None = inner.get_extra_info("socket")
        self._guard: AttemptGuard | None = None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    @property
    def guard(self) -> AttemptGuard | None:
        """The attempt whose request was last written here, until the response lets go of the socket."""
        return self._guard

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        guard = _current_guard()
        if guard is not None:
            self._guard = guard
            guard.attach(self._sock)
        self._inner.write(buffer, timeout)

    def release(self) -> None:
        """The attempt lets go of the socket: before the connection goes back to the pool or is closed."""
        if self._guard is not None:
            self._guard.detach(self._sock)
            self._guard = None

    def close(self) -> None:
        self.release()
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        guard = _current_guard()
        if guard is None or self._sock is None or isinstance(self._sock, ssl.SSLSocket):
            return _AttemptSocketStream(self._inner.start_tls(ssl_context, server_hostname, timeout))
        return _AttemptSocketStream(SyncStream(handshake(self._sock, ssl_context, server_hostname, guard, timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _AttemptSocketBackend(httpcore2.NetworkBackend):
    """httpcore's own socket backend, whose streams are `_AttemptSocketStream`s, and whose new connections
    are bounded by the attempt that needs them (see the module)."""

    def __init__(self) -> None:
        self._inner = httpcore2.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        guard = _current_guard()
        if guard is None:
            return _AttemptSocketStream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))
        failure: Exception = httpcore2.ConnectError(f"{host} has no address")
        give_up = give_up_at(timeout)  # the name lookup and every address's connect share the timeout
        for address in addresses(host, port, guard, give_up):
            try:
                return _AttemptSocketStream(SyncStream(
                    connect(address, guard, give_up, local_address, socket_options or ())))
            except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as exc:
                failure = exc
        raise failure

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        return _AttemptSocketStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _GuardedStream(httpx2.SyncByteStream):
    """A response body whose closing has the attempt let go of the connection's socket first (an error's,
    a redirect's; an event stream's is the subclass below)."""

    def __init__(self, inner: httpx2.SyncByteStream, network: _AttemptSocketStream) -> None:
        self._inner = inner
        self._network = network

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        self._network.release()
        self._inner.close()


class _ReusableEventStream(_GuardedStream):
    def __init__(self, inner: httpx2.SyncByteStream, network: _AttemptSocketStream, raw: Iterable[bytes],
                 timeouts: dict[str, Any] | None) -> None:
        super().__init__(inner, network)
        self._raw = raw
        self._timeouts = timeouts
        self._tail = b"\n"
        self.saw_done = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            if not self.saw_done:
                window = self._tail + chunk
                self.saw_done = DONE_MARKER in window
                self._tail = window[-len(DONE_MARKER):]
            yield chunk

    def close(self) -> None:
        """Drain a finished body before the socket is detached and the connection goes back to the pool."""
        if self.saw_done and self._timeouts is not None:
            self._timeouts["read"] = DRAIN_READ_TIMEOUT_SECONDS
            if (guard := self._network.guard) is not None:
                guard.bound(DRAIN_MAX_SECONDS)
            with contextlib.suppress(Exception):
                for _ in itertools.islice(self._raw, DRAIN_MAX_EVENTS):
                    pass
        super().close()


class KeepAliveTransport(httpx2.HTTPTransport):
    """`httpx2.HTTPTransport` whose event-stream responses are drained after `[DONE]`, and whose sockets
    are watched by the attempt that sends a request on them (see the module)."""

    def __init__(self, tls: Any, limits: httpx2.Limits) -> None:
        super().__init__(verify=tls, limits=limits)
        # The parent's own pool, rebuilt with the same TLS context and limits: httpx2 has no parameter for
        # httpcore's `network_backend`, which is how each connection's socket reaches its attempt.
        self._pool = httpcore2.ConnectionPool(
            ssl_context=tls, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_AttemptSocketBackend())

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        response = super().handle_request(request)
        stream = response.stream
        network = response.extensions.get("network_stream")  # the connection's own `_AttemptSocketStream`
        if not isinstance(stream, httpx2.SyncByteStream) or not isinstance(network, _AttemptSocketStream):
            return response
        raw = getattr(stream, "_httpcore_stream", None)
        if raw is not None and response.headers.get("content-type", "").startswith("text/event-stream"):
            timeouts = request.extensions.get("timeout")
            response.stream = _ReusableEventStream(stream, network, raw,
                                                   timeouts if isinstance(timeouts, dict) else None)
        elif network.guard is not None:
            response.stream = _GuardedStream(stream, network)
        return response


@functools.cache
def shared_tls_context() -> ssl.SSLContext:
    """The process's one TLS context for upstream connections. Making one costs a CA bundle load, a sixth of
    a second and 8 MB: made per endpoint, a deployment whose admins had pointed models at a few hundred
    endpoints (per-tenant gateways) held gigabytes of them in every worker process."""
    return httpx2.create_ssl_context()


class ShardedTransport(httpx2.BaseTransport):
    """A process's upstream connections spread over several pools, each thread always using the same one.

    httpcore's pool looks at every connection it holds, under one lock, on each request and each
    release, so with hundreds of turns in flight in a process every request pays for all of them
    (`make bench`, the runs with 200 and 1,000 turns in flight). A thread keeps its shard, so the
    connection its last turn used is there for its next. The shards, and every endpoint's transport, share
    one TLS context (`shared_tls_context`).
    """

    def __init__(self, shards: int, limits: httpx2.Limits) -> None:
        tls = shared_tls_context()
        share = httpx2.Limits(
            max_connections=None if limits.max_connections is None else max(1, limits.max_connections // shards),
            max_keepalive_connections=None if limits.max_keepalive_connections is None
            else max(1, limits.max_keepalive_connections // shards),
            keepalive_expiry=limits.keepalive_expiry)
        self._shards = [KeepAliveTransport(tls, share) for _ in range(shards)]
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
