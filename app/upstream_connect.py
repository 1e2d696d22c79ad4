"""A new upstream connection, bounded by the attempt that needs it.

Before a new connection has a socket there is nothing to shut, so the attempt's own bounds are applied
to the steps that come first: the name lookup runs on a thread of its own while the attempt waits for
it, its stop or its deadline, whichever comes first (`getaddrinfo` has no timeout, and a stalled name
server holds it for the resolver's own retries, tens of seconds). Each TCP connect and TLS handshake
is bounded the same way: it runs without blocking and is waited for a tick at a time, so it ends at
its own timeout, the attempt's deadline or the attempt's stop, whichever comes first.

A step given up or failed is httpcore's connect error, as its own backend raises, so the SDK reports a connection
failure and the fallback runs. The transport (`app.upstream_transport`) makes its new connections here while an
attempt's guard watches its thread's request, and hands the socket to that guard once the request is written.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import httpcore2

from app.attempt_watchdog import TICK_SECONDS
from app.endpoint_urls import METADATA_REFUSED, is_metadata_address


class AttemptGuard(Protocol):
    """What watches an attempt's socket (`app.attempt_watchdog.Watch`)."""

    def attach(self, sock: socket.socket | None) -> None: ...

    def detach(self, sock: socket.socket | None) -> None: ...

    def bound(self, seconds: float) -> None: ...

    def remaining(self) -> float: ...

    def ended(self) -> bool: ...


def resolve_host(host: str, port: int) -> list[tuple[Any, ...]]:
    """The name service's addresses for `host` (the system resolver; the tests stand in a stalled one)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


_Address = tuple[int, tuple[Any, ...]]
"""A socket family and address as the name service gives them (an IPv6 address keeps its scope)."""


def _socket_addresses(infos: Iterable[tuple[Any, ...]]) -> list[_Address]:
    return list(dict.fromkeys((info[0], info[4]) for info in infos))


class _Lookup(threading.Thread):
    """One name lookup on a thread of its own, so that the attempt waiting for it can give up on it; the
    attempts that need the same name meanwhile wait for the same lookup (`_lookup_of`)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(name="upstream-lookup", daemon=True)
        self.host, self.port = host, port
        self.done = threading.Event()
        self.addresses: list[_Address] = []
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            self.addresses = _socket_addresses(resolve_host(self.host, self.port))
        except OSError as exc:
            self.error = exc
        finally:
            with _lookups_lock:
                if _lookups.get((self.host, self.port)) is self:
                    del _lookups[(self.host, self.port)]
            self.done.set()


_lookups: dict[tuple[str, int], _Lookup] = {}
_lookups_lock = threading.Lock()


def _forget_lookups() -> None:
    """In a forked child, which has none of its parent's threads: a lookup in flight there would never end."""
    global _lookups_lock
    _lookups.clear()
    _lookups_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_lookups)


def _lookup_of(host: str, port: int) -> _Lookup:
    """The lookup of `host` in flight, or a new one. An attempt that gives up on a lookup leaves its thread
    until the name service answers (`getaddrinfo` has no timeout): one each, a stalled resolver and a few
    hundred attempts a second made thousands of threads, until none could be started."""
    with _lookups_lock:
        lookup = _lookups.get((host, port))
        if lookup is None:
            lookup = _Lookup(host, port)
            lookup.start()  # first: a lookup that could not start must not be waited for by the next attempts
            _lookups[(host, port)] = lookup
    return lookup


def _wait_a_tick_at_a_time(ready: Callable[[float], bool], guard: AttemptGuard, give_up: float, step: str) -> None:
    """Wait until `ready(seconds)` says the step is done, a tick at a time; a connect timeout once the attempt
    is stopped or out of time, or at `give_up` (the step's own timeout)."""
    while True:
        if guard.ended():
            raise httpcore2.ConnectTimeout(f"{step} was given up: the attempt was stopped or ran out of time")
        left = give_up - time.monotonic()
        if left <= 0:
            raise httpcore2.ConnectTimeout(f"{step} did not end within its timeout")
        if ready(min(TICK_SECONDS, left, max(guard.remaining(), 0.0))):
            return


def _socket_ready(sock: socket.socket, events: int) -> Callable[[float], bool]:
    poller = select.poll()
    poller.register(sock, events)
    return lambda seconds: bool(poller.poll(seconds * 1000))


def give_up_at(timeout: float | None) -> float:
    """When a step with `timeout` ends on its own; the attempt's deadline and stop bound it besides."""
    return math.inf if timeout is None else time.monotonic() + timeout


def addresses(host: str, port: int, guard: AttemptGuard, give_up: float) -> list[_Address]:
    """`host`'s addresses (an address is its own, with no lookup), or a connect error at `give_up` (the end
    of the connect's timeout) or as soon as the attempt is stopped or out of time."""
    try:
        return _socket_addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST))
    except socket.gaierror:
        pass
    try:
        lookup = _lookup_of(host, port)
    except RuntimeError as exc:  # no thread could be started
        raise httpcore2.ConnectError(f"looking up {host}: {exc}") from exc
    _wait_a_tick_at_a_time(lookup.done.wait, guard, give_up, f"looking up {host}")
    if lookup.error is not None:
        raise httpcore2.ConnectError(f"looking up {host}: {lookup.error}") from lookup.error
    return lookup.addresses


def connect(address: _Address, guard: AttemptGuard, give_up: float, local_address: str | None,
             socket_options: Iterable[Any]) -> socket.socket:
    """A connected socket, or a connect error at `give_up` (the end of the connect's timeout, shared with the
    name lookup and the other addresses) or as soon as the attempt is stopped or out of time (a blocking
    connect cannot be interrupted: a host that drops the SYN held a stop for the whole timeout). Every
    `OSError` is a connect error, as in httpcore's own backend, so the SDK reports it."""
    family, sockaddr = address
    step = f"connecting to {sockaddr[0]}:{sockaddr[1]}"
    if is_metadata_address(sockaddr[0]):
        raise httpcore2.ConnectError(f"{step} was refused: an endpoint {METADATA_REFUSED}")
    if guard.ended():
        raise httpcore2.ConnectTimeout(f"{step} was given up: the attempt was stopped or ran out of time")
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise httpcore2.ConnectError(f"{step}: {exc}") from exc
    with _closed_on_failure(sock, step):
        if local_address is not None:
            sock.bind((local_address, 0))
        sock.setblocking(False)
        code = sock.connect_ex(sockaddr)
        if code in (errno.EINPROGRESS, errno.EINTR):
            _wait_a_tick_at_a_time(_socket_ready(sock, select.POLLOUT), guard, give_up, step)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            raise httpcore2.ConnectError(f"{step}: {os.strerror(code)}")
        sock.setblocking(True)
        for option in socket_options:
            sock.setsockopt(*option)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


def handshake(sock: socket.socket, ssl_context: ssl.SSLContext, server_hostname: str | None,
               guard: AttemptGuard, timeout: float | None) -> ssl.SSLSocket:
    """`sock` with TLS, its handshake bounded like the connect before it (a server that accepts and then
    says nothing held a stop for the connect timeout)."""
    step = f"the TLS handshake with {server_hostname}"
    give_up = give_up_at(timeout)
    with _closed_on_failure(sock, step):
        tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
    with _closed_on_failure(tls, step):
        tls.setblocking(False)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                _wait_a_tick_at_a_time(_socket_ready(tls, select.POLLIN), guard, give_up, step)
            except ssl.SSLWantWriteError:
                _wait_a_tick_at_a_time(_socket_ready(tls, select.POLLOUT), guard, give_up, step)
        tls.setblocking(True)
        return tls


@contextlib.contextmanager
def _closed_on_failure(sock: socket.socket, step: str) -> Iterator[None]:
    """`sock` is closed if `step` fails, and any `OSError` is a connect error, as in httpcore's own backend
    (the SDK reports it as a connection failure, so the fallback runs)."""
    try:
        yield
    except OSError as exc:
        sock.close()
        raise httpcore2.ConnectError(f"{step}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
