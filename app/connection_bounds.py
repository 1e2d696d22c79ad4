"""What bounds a PostgreSQL connection of agentq's besides its connect timeout: how it notices a server gone or
one that stopped answering, how the server notices it gone, how long its session may sit idle in a transaction,
and when a pooled one is pinged.

A pooled connection is pinged before use only when it sat idle in the pool for longer than `IDLE_PING_SECONDS`
(SQLAlchemy's "pessimistic disconnect handling" through the checkout event): `pool_pre_ping` would add a round
trip to every transaction, three a turn, to guard against a server restart that a connection in steady use notices
on its next statement anyway (that statement fails, the pool is invalidated, and the unit of work is retried: a
Dramatiq retry in a worker, a 503 with Retry-After in the API).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg
from sqlalchemy import Engine, event
from sqlalchemy.engine import Dialect, ExceptionContext
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from app.config import get_settings

log = logging.getLogger(__name__)

IDLE_PING_SECONDS = 1.0


def idle_transaction_limit_ms() -> int:
    """How long the server lets one of this process's sessions sit in a transaction with nothing sent: a lease.

    A worker cut off from the database mid-transaction (a partition that drops its packets) leaves its session
    idle in that transaction, holding its row locks, until the server notices, which its TCP keepalives (two
    hours by default) are slow to: a claim's lock on a user's row would hold every POST, claim and settlement of
    that user on every process for as long as the partition lasted. A lease is what such a
    worker's runs are given up after anyway, and no transaction of agentq's waits on anything between its
    statements for nearly that long (each is a few statements, milliseconds)."""
    return max(int(get_settings().lease_seconds * 1000), 1000)


CLIENT_CHECK_MS = 1000
"""How often the server looks, while it runs or queues a statement, whether its client is still there."""


def session_settings() -> dict[str, int]:
    """What each new connection sets on the server's side of its session: the bound on an idle transaction, and
    the server's own dead-peer detection, as the client's (`dead_peer_detection`): a session whose client a
    partition took away otherwise stayed, holding one of `max_connections`, for the server's two hours of
    keepalives, and a worker that reconnected after each of a few partitions could use the server's
    connections up. Over a Unix socket the server ignores its TCP settings. And a statement whose client
    closed the connection while it waited (`AnswerBoundConnection` gave up on it, behind a lock a schema change
    or a cut-off session held) ends within `CLIENT_CHECK_MS`, where it waited on for its lock, its session kept,
    one more a retry (`client_connection_check_interval`, PostgreSQL 14 and later; an earlier server refuses it,
    and keeps the others)."""
    peer = dead_peer_detection()
    return {"idle_in_transaction_session_timeout": idle_transaction_limit_ms(),
            "tcp_keepalives_idle": peer["keepalives_idle"], "tcp_keepalives_interval": peer["keepalives_interval"],
            "tcp_keepalives_count": peer["keepalives_count"], "tcp_user_timeout": peer["tcp_user_timeout"],
            "client_connection_check_interval": CLIENT_CHECK_MS}


def set_session_settings(engine: Engine) -> None:
    """Set on each new connection in one round trip, not in its start-up `options`, which PgBouncer refuses
    unless told to ignore them; committed, or the pool's first rollback would undo them. A server that refuses
    one (a release before PostgreSQL 12 has no `tcp_user_timeout`; a pooler may filter `SET`s) has the others
    set one by one, and the refused named in a warning: the connection is still used, as it was before these
    bounds."""
    statements = [f"SET {name} = {value}" for name, value in session_settings().items()]

    @event.listens_for(engine, "connect")
    def _settled(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        global _refusal_said
        refused = apply_session_settings(dbapi_connection, statements)
        if refused and not _refusal_said:
            _refusal_said = True
            log.warning("the database refused %s on a new connection (said once a process); its sessions are "
                        "bounded by the server's defaults alone there", "; ".join(refused))


_refusal_said = False


def apply_session_settings(dbapi_connection: DBAPIConnection, statements: list[str]) -> list[str]:
    """The statements run in one round trip, or, when the server refuses that, one by one; those it refused
    (it answered with an error: a connection lost is raised)."""
    if not _refused(dbapi_connection, ["; ".join(statements)]):
        return []
    return _refused(dbapi_connection, statements)


def _refused(dbapi_connection: DBAPIConnection, statements: list[str]) -> list[str]:
    """Each statement in a transaction of its own, committed; those the server refused, rolled back."""
    refused = []
    for statement in statements:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(statement)
            dbapi_connection.commit()
        except psycopg.Error as error:
            if error.sqlstate is None or error.sqlstate.startswith("08"):
                raise
            dbapi_connection.rollback()
            refused.append(statement)
        finally:
            cursor.close()
    return refused


def dead_peer_detection() -> dict[str, int]:
    """libpq's TCP settings that tell a connection whose server is gone (a failover that moved its address, a
    host that died) within half a lease: what is sent and not acknowledged for that long fails, and an idle
    connection is probed. The kernel's defaults retransmit for about fifteen minutes: a lease renewal sent
    on such a connection hung the lease keeper that long, every lease of the process ran out meanwhile, and
    other workers took its turns over while it still streamed them. Acknowledgement is the peer's kernel's,
    so a slow query is not cut."""
    half_lease_ms = max(int(get_settings().lease_seconds * 500), 1000)
    return {"keepalives": 1, "keepalives_idle": max(half_lease_ms // 3000, 1), "keepalives_interval": 1,
            "keepalives_count": 3, "tcp_user_timeout": half_lease_ms}


def ping_idle_connections(engine: Engine) -> None:
    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _taken(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry,
               _proxy: PoolProxiedConnection) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < IDLE_PING_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise DisconnectionError("a pooled connection failed its ping") from exc
        if not alive:
            raise DisconnectionError("a pooled connection failed its ping")


_answer_bound: ContextVar[float | None] = ContextVar("answer_bound", default=None)
_UNBOUNDED = -1.0


class AnswerBoundConnection(psycopg.Connection[Any]):
    """A connection that waits `AGENTQ_DB_ANSWER_TIMEOUT_SECONDS` at most for its server's answer.

    A server that stops answering while its host's kernel still does (its processes frozen, a storage stall,
    a VM paused) acknowledges what is sent and answers keepalives, so neither `tcp_user_timeout` nor the
    keepalives ever fire: every request of the API, `/readyz` included, and every lease renewal waited for
    as long as the server stayed silent (a hunt froze it for 90 s). A wait that outlasts the bound closes
    the connection and raises a psycopg `OperationalError`, which SQLAlchemy takes for a connection lost:
    the pool is invalidated and the unit of work meets an outage (the API's 503 with `Retry-After`, a worker's
    wait for its database), as it does a server gone. A healthy server's lock wait that long (behind a schema
    change, or a session a partition cut off, which the server ends after a lease) is cut alike: answered as an
    outage, its statement ended by the server (`CLIENT_CHECK_MS`). A wait psycopg gives a timeout of its own
    keeps it; a schema change, which may take minutes on a large table, runs unbounded (`answers_within(None)`)."""

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is not None:
            return super().wait(gen, interval, timeout)
        chosen = _answer_bound.get()
        if chosen == _UNBOUNDED:
            return super().wait(gen, interval)
        bound = get_settings().db_answer_timeout_seconds if chosen is None else chosen
        started = time.monotonic()
        try:
            return super().wait(gen, interval, bound)
        except psycopg.OperationalError as error:
            if self.closed or time.monotonic() - started < bound:
                raise
            self.pgconn.finish()  # mid-exchange: the connection cannot be used again
            setting = " (AGENTQ_DB_ANSWER_TIMEOUT_SECONDS)" if chosen is None else ""
            raise psycopg.OperationalError(f"the database server did not answer within {bound:g} s{setting}") from error


@contextmanager
def answers_within(seconds: float | None) -> Iterator[None]:
    """This thread's waits for the server bounded by `seconds` instead of the setting; None for no bound."""
    token = _answer_bound.set(_UNBOUNDED if seconds is None else seconds)
    try:
        yield
    finally:
        _answer_bound.reset(token)


SESSION_ENDED = frozenset({"25P03", "57P01", "57P02"})
"""The server ended the session: idle in a transaction past its limit, an administrator's or a crash's shutdown."""


def connection_lost(error: BaseException, dbapi_connection: Any) -> bool:
    """Whether a driver error leaves its connection unusable, for the pool to drop it. SQLAlchemy's psycopg dialect
    asks only whether libpq has marked the connection bad, which it does once it has read the end of the
    connection; an error that comes before that (the session ended by the server, whose last message libpq read
    as it sent the next query: "sending query failed: terminating connection due to idle-in-transaction timeout",
    with no state) left the connection in the pool, and its rollback then failed too ("another command is
    already in progress"). An error libpq raised itself (no state), a connection exception (08) and an ended
    session count as lost."""
    if dbapi_connection is not None and (dbapi_connection.closed or dbapi_connection.broken):
        return True
    if not isinstance(error, psycopg.Error) or isinstance(error, psycopg.errors.PipelineAborted):
        return False  # a statement after a failed one in a pipeline: that one's error says what happened
    state = error.sqlstate
    if state is None:
        return isinstance(error, psycopg.OperationalError)
    return state.startswith("08") or state in SESSION_ENDED


def count_lost_connections(engine: Engine) -> None:
    """Make SQLAlchemy's own execution path judge a lost connection by `connection_lost` (`app.prepared` asks it
    directly)."""

    @event.listens_for(engine, "handle_error")
    def _judged(context: ExceptionContext) -> None:
        # The dialect has judged the connection's own state already (`is_disconnect`); the error's is judged here.
        if not context.is_disconnect and connection_lost(context.original_exception, None):
            context.is_disconnect = True


def bound_server_answers(engine: Engine) -> None:
    """Every connection the engine opens waits a bounded time for its server's answers
    (`AnswerBoundConnection`): a pool's connection is made here, whoever asks for it."""

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Dialect, _record: ConnectionPoolEntry, cargs: tuple[Any, ...],
                 cparams: dict[str, Any]) -> AnswerBoundConnection:
        return AnswerBoundConnection.connect(*cargs, **cparams)
