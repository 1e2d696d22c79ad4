"""The database engine and the two ways to open a unit of work.

Services open `transaction()` (an ORM session) once per use case, or `plain_transaction()` (a Core
connection) where a hot path needs no ORM; nothing else commits. On SQLite (the embedded
default) every transaction starts with BEGIN IMMEDIATE so concurrent writers queue on the busy
timeout instead of failing half-way with "database is locked".

A PostgreSQL connection is bounded by `app.connection_bounds` (how long it may take, how it notices a server
gone or silent, when a pooled one is pinged), a SQLite file made and opened by `app.sqlite_engine`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Executable, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.config import get_settings, without_password
from app.connection_bounds import (
    bound_server_answers,
    count_lost_connections,
    dead_peer_detection,
    ping_idle_connections,
    set_session_settings,
)
from app.sqlite_engine import sqlite_engine

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, tuple[Engine, sessionmaker[Session]]] = {}


def _build_engine(url: str, create: bool) -> Engine:
    if url.startswith("sqlite"):
        return sqlite_engine(url, create)
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
    bound_server_answers(engine)
    count_lost_connections(engine)
    ping_idle_connections(engine)
    set_session_settings(engine)
    return engine


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
