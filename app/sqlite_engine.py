"""The engine of the embedded default, a SQLite file: made only by `agentq db init` (any other command is refused a
file not there yet), its owner's alone, opened in WAL mode with foreign keys on, and every transaction begun with
BEGIN IMMEDIATE so that concurrent writers queue on the busy timeout instead of failing half-way with "database is
locked".
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry

from app.errors import DatabaseAwaitsUpgrade, DatabaseNotCreated, InvalidConfiguration
from app.sqlite_upgrades import money_awaits_conversion

BUSY_TIMEOUT_MS = 30_000
"""How long a transaction waits for the file's write lock, which every one takes (`BEGIN IMMEDIATE`): past the
longest write agentq makes, so that a busy moment is waited out, not failed."""


@contextlib.contextmanager
def pragma_for_a_while(connection: Connection, pragma: str, during: object, after: object) -> Iterator[None]:
    """A SQLite connection's `pragma` set to `during` until the block ends, then to `after`, the engine's own
    setting (the pool hands the connection on). Set before the connection's transaction begins: SQLite ignores
    some pragmas inside one, and applies the others to the next."""
    driver = connection.connection.driver_connection
    assert driver is not None, "a pooled connection holds its driver's"
    driver.execute(f"PRAGMA {pragma}={during}")
    try:
        yield
    finally:
        driver.execute(f"PRAGMA {pragma}={after}")


@contextlib.contextmanager
def lock_waits_within(connection: Connection, seconds: float) -> Iterator[None]:
    """On SQLite, this connection's wait for the file's write lock bounded by `seconds` instead of the busy
    timeout, for a probe that must answer within moments (`/readyz`): an outside writer holding the lock (an
    operator's `sqlite3` shell left in a transaction) held it the whole 30 s. Nothing on another database."""
    if connection.dialect.name != "sqlite":
        yield
        return
    with pragma_for_a_while(connection, "busy_timeout", int(seconds * 1000), BUSY_TIMEOUT_MS):
        yield


def sqlite_engine(url: str, create: bool) -> Engine:
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
    where = str(Path(parsed.database).resolve()) if parsed.database else url
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.close()
        if not create and money_awaits_conversion(dbapi_connection):
            dbapi_connection.close()
            raise DatabaseAwaitsUpgrade(f"The SQLite file {where} was written by an earlier release "
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
