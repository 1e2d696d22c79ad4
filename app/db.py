"""The database engine and the two ways to open a unit of work.

Services open `transaction()` (an ORM session) once per use case, or `plain_transaction()` (a Core
connection) where a hot path needs no ORM; nothing else commits. On SQLite (the embedded
default) every transaction starts with BEGIN IMMEDIATE so concurrent writers queue on the busy
timeout instead of failing half-way with "database is locked".

A pooled PostgreSQL connection is pinged before use only when it sat idle in the pool for longer
than `IDLE_PING_SECONDS` (SQLAlchemy's "pessimistic disconnect handling" through the checkout
event): `pool_pre_ping` would add a round trip to every transaction, three a turn, to guard
against a server restart that a connection in steady use notices on its next statement anyway
(that statement fails, the pool is invalidated, and the unit of work is retried: a Dramatiq retry
in a worker, a 503 with Retry-After in the API).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
from sqlalchemy import Connection, CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from app.config import get_settings, without_password
from app.errors import DatabaseAwaitsUpgrade, DatabaseNotCreated, InvalidConfiguration
from app.sqlite_upgrades import money_awaits_conversion

log = logging.getLogger(__name__)

IDLE_PING_SECONDS = 1.0

_lock = threading.Lock()
_engines: dict[str, tuple[Engine, sessionmaker[Session]]] = {}


def _sqlite_engine(url: str, create: bool) -> Engine:
    parsed = make_url(url)
    # A `file:` URI (`?uri=true`) is the driver's to read: what it names is not judged here.
    path = "" if parsed.query.get("uri") == "true" else (parsed.database or "")
    if path and path != ":memory:":
        if not create and not Path(path).exists():
            raise DatabaseNotCreated(f"The SQLite file {Path(path).resolve()} does not exist: run `agentq db init` "
                                     "to create it (a SQLite path is relative to the directory a command runs in).")
        try:
            _make_private(Path(path))
        except OSError as exc:
            raise InvalidConfiguration(f"DATABASE_URL names the SQLite file {Path(path).resolve()}, whose directory "
                                       f"cannot be made: {exc.strerror or exc}.") from exc
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        if not create and money_awaits_conversion(dbapi_connection):
            dbapi_connection.close()
            raise DatabaseAwaitsUpgrade(f"The SQLite file {database_location()} was written by an earlier release "
                                        "and its amounts are not yet in millionths: run `agentq db init` to upgrade "
                                        "it.")

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _make_private(path: Path) -> None:
    """Make a new SQLite file, and the directory it is the first file of, its owner's alone: it holds every
    conversation and every API key's hash, and was made with the umask's mode (world-readable under the usual
    022) by any `agentq db init` but `make run`'s, whose Makefile made its directory private. SQLite gives its
    `-wal` and `-shm` files the database file's mode. A file or directory that exists is left as it is: its
    mode is its operator's choice."""
    made = not path.parent.is_dir()
    path.parent.mkdir(parents=True, exist_ok=True)  # a file in its place: "File exists"
    if made:
        path.parent.chmod(0o700)
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile: its mode stands
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _build_engine(url: str, create: bool) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, create)
    settings = get_settings()
    engine = create_engine(
        url,
        # libpq's default is to wait for ever: a server that accepts and never answers (a half-dead host, a
        # stuck proxy) held every request and /readyz for the kernel's TCP timeout, over two minutes.
        connect_args={"connect_timeout": settings.db_connect_timeout_seconds, **dead_peer_detection()},
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        pool_recycle=1800,
    )
    _ping_idle_connections(engine)
    _set_session_settings(engine)
    return engine


def idle_transaction_limit_ms() -> int:
    """How long the server lets one of this process's sessions sit in a transaction with nothing sent: a lease.

    A worker cut off from the database mid-transaction (a partition that drops its packets) leaves its session
    idle in that transaction, holding its row locks, until the server notices, which its TCP keepalives (two
    hours by default) are slow to: a chaos hunt saw a claim's lock on a user's row hold every POST, claim and
    settlement of that user on every process for as long as the partition lasted. A lease is what such a
    worker's runs are given up after anyway, and no transaction of agentq's waits on anything between its
    statements for nearly that long (each is a few statements, milliseconds)."""
    return max(int(get_settings().lease_seconds * 1000), 1000)


def session_settings() -> dict[str, int]:
    """What each new connection sets on the server's side of its session: the bound on an idle transaction, and
    the server's own dead-peer detection, as the client's (`dead_peer_detection`): a session whose client a
    partition took away otherwise stayed, holding one of `max_connections`, for the server's two hours of
    keepalives, and a worker that reconnected after each of a few partitions could use the server's
    connections up. Over a Unix socket the server ignores its TCP settings."""
    peer = dead_peer_detection()
    return {"idle_in_transaction_session_timeout": idle_transaction_limit_ms(),
            "tcp_keepalives_idle": peer["keepalives_idle"], "tcp_keepalives_interval": peer["keepalives_interval"],
            "tcp_keepalives_count": peer["keepalives_count"], "tcp_user_timeout": peer["tcp_user_timeout"]}


def _set_session_settings(engine: Engine) -> None:
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


def _ping_idle_connections(engine: Engine) -> None:
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


def _engine_and_factory(create: bool = False) -> tuple[Engine, sessionmaker[Session]]:
    url = get_settings().database_url
    found = _engines.get(url)
    if found is None:
        with _lock:
            found = _engines.get(url)
            if found is None:
                engine = _build_engine(url, create)
                found = (engine, sessionmaker(engine, expire_on_commit=False))
                _engines[url] = found
    return found


def get_engine(*, create: bool = False) -> Engine:
    """The process's engine for DATABASE_URL; `create` (`agentq db init` only) makes a SQLite file not there
    yet, which any other caller is refused (`DatabaseNotCreated`) until it has been made."""
    return _engine_and_factory(create)[0]


def database_location() -> str:
    """Where this process's data lives, as an operator must be told it: a SQLite path made absolute (it is
    relative to the directory a command runs in, the usual cause of a database found empty), any other
    URL without its password."""
    url = make_url(get_settings().database_url)
    if url.get_backend_name() == "sqlite" and url.database:
        return str(Path(url.database).resolve())
    return without_password(url.render_as_string(hide_password=False))


@contextmanager
def transaction() -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back on any exception."""
    factory = _engine_and_factory()[1]
    with factory.begin() as session:
        yield session


@contextmanager
def plain_transaction() -> Iterator[Connection]:
    """A unit of work on a plain connection, for the hot paths that need no ORM (a turn's intake, claim
    and settlement: `app.prepared` statements and Core selects): an ORM session's set-up and commit
    bookkeeping cost more than those statements (this machine: 180 against 110 µs of CPU a
    transaction)."""
    with get_engine().begin() as connection:
        yield connection


def rows_changed(session: Session, statement: Executable) -> int:
    """The rows an UPDATE or DELETE statement matched: its result is a `CursorResult`, which counts them, though
    `Session.execute` is typed as returning any `Result`."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount


T = TypeVar("T")
IN_LIST_BATCH = 1000
"""Values an `IN (...)` list is given at a time: each is a bound parameter, and a statement may carry at
most 65,535 of them on PostgreSQL and 32,766 on SQLite; dead letters, for one, can outnumber both."""


def in_batches(values: Iterable[T]) -> Iterator[list[T]]:
    batch: list[T] = []
    for value in values:
        batch.append(value)
        if len(batch) == IN_LIST_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def ping() -> None:
    """One round trip to the database on a pooled connection; raises when it does not answer."""
    with get_engine().connect() as connection:
        connection.exec_driver_sql("SELECT 1")


def open_pool() -> None:
    """Open the pool's connections now, so the first turns of a fresh worker do not pay for them."""
    engine = get_engine()
    size = get_settings().db_pool_size if engine.dialect.name == "postgresql" else 1
    with ExitStack() as opened:  # each one back to the pool, the first ones too when a later one fails
        for _ in range(size):
            opened.enter_context(engine.connect())


def dispose_engines() -> None:
    """Drop pooled connections; called after fork so children never share a parent's sockets."""
    with _lock:
        for engine, _ in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
