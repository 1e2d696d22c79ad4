"""One Redis connection pool per process, created on first use (never at import)."""

from __future__ import annotations

import threading
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from app.config import get_settings, without_password

StreamEntry = tuple[bytes, dict[bytes, bytes]]
"""An entry of a Redis stream as redis-py returns it: its id and its fields. redis-py types every reply as
"an awaitable or anything" (one client class serves both its sync and async APIs); the callers cast each
reply to its shape, which also says what the command returns."""

_lock = threading.Lock()
_clients: dict[str, redis.Redis] = {}

SOCKET_TIMEOUT_SECONDS = 5.0
"""How long a reply may take; a blocking read (`XREAD BLOCK`) must ask Redis for less, or a quiet
stream would end each wait in a client-side timeout and a dropped connection."""


CONNECTION_OPTIONS: dict[str, Any] = {
    "socket_timeout": SOCKET_TIMEOUT_SECONDS,
    "socket_connect_timeout": 2,
    "health_check_interval": 30,
    "max_connections": 1000,
}
"""How every Redis connection of a process is made, agentq's own (`get_redis`) and the broker's
(`workers.broker`), so an outage is met alike by both: a host gone is noticed within 2 s of a connect and a
hung server within the socket timeout, a pooled connection idle past 30 s is checked with a PING before
it is used again (a firewall or a Redis `timeout` may have dropped it), and each pool holds at most 1,000."""


class _LeavesAReplica:
    """A connection that a `READONLY` reply leaves: its next command connects afresh. After a failover behind an
    address that moved (a managed Redis's DNS name, a proxy), the old primary, now a replica, refuses every
    write on the connections it still holds, and redis-py keeps using them: every process of agentq waited
    out an "outage" that had ended, `/readyz` 503 and no turn run, until each was restarted. The connection
    is dropped at its next send rather than at the reply, since a pipeline still reads its other replies
    from it; redis-py's Sentinel connections leave a demoted primary the same way."""

    _server_is_a_replica = False

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.exceptions.ReadOnlyError:
            self._server_is_a_replica = True
            raise

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if self._server_is_a_replica:
            self._server_is_a_replica = False
            self.disconnect()  # type: ignore[attr-defined]
        super().send_packed_command(command, check_health)  # type: ignore[misc]


@cache
def _leaving_replicas(connection_class: type) -> type:
    return type(f"PrimaryOnly{connection_class.__name__}", (_LeavesAReplica, connection_class), {})


def leaving_replicas(pool: redis.ConnectionPool) -> redis.ConnectionPool:
    """`pool`, whose connections leave a server that turned into a replica (`_LeavesAReplica`), whichever kind
    its address made them (TCP, TLS, a Unix socket)."""
    pool.connection_class = _leaving_replicas(pool.connection_class)
    return pool


def get_redis() -> redis.Redis:
    url = get_settings().redis_url
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis(connection_pool=leaving_replicas(
                    redis.ConnectionPool.from_url(url, **CONNECTION_OPTIONS)))
                _clients[url] = client
    return client


def redis_location() -> str:
    """REDIS_URL as an operator must be told it: without its password."""
    return without_password(get_settings().redis_url)


def reset_redis() -> None:
    """Forget pools after fork so a child never reuses its parent's sockets."""
    with _lock:
        _clients.clear()


def key(*parts: object) -> str:
    """A key of agentq's own (locks, slots, streams, stop flags), under `AGENTQ_REDIS_KEY_PREFIX`."""
    return get_settings().redis_key_prefix + ":" + ":".join(str(p) for p in parts)


@cache
def lua_script(name: str) -> Script:
    """A script of app/lua, read and hashed once per process; callers pass the client, so it survives a fork."""
    return Script(get_redis(), resources.files("app").joinpath("lua", f"{name}.lua").read_text().encode())
