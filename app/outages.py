"""Whether an error means a backing service is out of reach (down, restarting, failing over, its pool
exhausted) rather than that the work or the statement is wrong: what waits an outage out (a delivery's
retries, a stream reader, a finished run's settlement: `waiting_out_outages`) must not also wait out a
real bug.

`OperationalError` alone is too wide for that: it also covers a statement timeout, a deadlock, a lock
not available, and on SQLite a missing table. Only a connection that failed or was lost counts, a server
that cannot serve for a while (shutting down, starting, out of connections, its disk or memory full), and on
SQLite a database file whose write lock another process held past the busy timeout (the embedded
database's one writer at a time: an operator's `sqlite3` shell in a transaction, a long outside write),
which is out of reach for as long as that lasts, or whose disk is full. A missing table, a refused login, a
column of a later release are setup steps, not outages: `app.setup_problems` tells them apart, and
`app.failure_logs` says each kind of failure as it should be said.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import dramatiq.errors
import psycopg
import redis
import sqlalchemy.exc

log = logging.getLogger(__name__)
T = TypeVar("T")

_SERVER_CANNOT_SERVE = frozenset({"57P01", "57P02", "57P03", "53300", "53100", "53200"})
"""PostgreSQL's admin shutdown, crash shutdown, cannot connect now (starting up), too many connections, and its
disk or memory full: the server's state for a while, as a Redis at its `maxmemory` is, which an operator mends
and a retry then finds mended."""


REDIS_UNAVAILABLE: tuple[type[redis.RedisError], ...] = (
    redis.ConnectionError, redis.TimeoutError, redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
"""Redis out of reach, or refusing every write for a while: a Redis at its `maxmemory` with `noeviction` ("OOM
command not allowed"), or a replica after a failover ("READONLY"), until memory is freed or the clients reach
the new primary; the service's state, like a restart, not a request's fault nor a bug. (A refused login, a
`ConnectionError` too, is not: `is_outage` and the API's handlers tell it apart first.)"""


def under_the_broker(error: BaseException) -> BaseException:
    """The Redis client's error under Dramatiq's `BrokerConnectionError` (its broker raises `ConnectionClosed` from
    it): a send during a Redis restart is an outage as any other Redis call in it is, said in one line."""
    if isinstance(error, dramatiq.errors.BrokerConnectionError) and error.__cause__ is not None:
        return error.__cause__
    return error


def is_outage(error: BaseException) -> bool:
    error = under_the_broker(error)
    if isinstance(error, redis.AuthenticationError):
        return False
    if isinstance(error, (*REDIS_UNAVAILABLE, sqlalchemy.exc.TimeoutError, dramatiq.errors.BrokerConnectionError)):
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        if error.orig is not None:
            error = error.orig
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or state.startswith("08") or state in _SERVER_CANNOT_SERVE
    if isinstance(error, sqlite3.OperationalError):
        return getattr(error, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_FULL)
    return False


def is_database_outage(error: BaseException) -> bool:
    """An outage of the database, what a worker process stops fetching for (`app.database_reach`): not one of
    Redis, since a process that cannot reach Redis fetches nothing anyway, nor a wait for a connection of a
    full pool (`sqlalchemy.exc.TimeoutError`), since the database answers that busy process's other
    connections, and its probe would wait in the same queue."""
    error = under_the_broker(error)
    return is_outage(error) and not isinstance(error, (redis.RedisError, sqlalchemy.exc.TimeoutError,
                                                       dramatiq.errors.BrokerConnectionError))


def driver_error(error: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrapper (`orig`), which carries what the server said."""
    return getattr(error, "orig", None) or error


def in_one_line(error: BaseException) -> str:
    """What an operator needs of a driver's error (the server refused, the database does not exist): its
    first line, not SQLAlchemy's statement and parameters and background link, which split one log record
    over several lines of a plain log."""
    cause = driver_error(under_the_broker(error))
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[0]}" if text else type(cause).__name__


def waiting_out_outages(write: Callable[[], T], *, for_seconds: float, what: str,
                        stopping: Callable[[], bool] | None = None) -> T:
    """`write()`, tried again while it fails because a backing service is out of reach, for up to
    `for_seconds` or until `stopping()` (the process is shutting down); any other error, or the outage
    outlasting that, is raised.

    For a write whose only alternative is to throw work away: a worker that finished an answer while the
    database was down would otherwise raise, and the delivery that retries its turn would call the model
    again (paid twice). The pauses stay short (a second at most) so that the write lands as soon as the
    database is back, ahead of a recovery sweep that would take the run over (`app.recovery` gives live
    holders that moment)."""
    give_up_at = time.monotonic() + for_seconds
    pause, tries = 0.1, 0
    while True:
        try:
            written = write()
        except Exception as error:
            if not is_outage(error) or time.monotonic() + pause > give_up_at or (stopping is not None and stopping()):
                raise
            if tries == 0:
                log.warning("%s: a backing service is out of reach (%s); waiting it out", what, type(error).__name__)
            tries += 1
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
            continue
        if tries:
            log.info("%s: done after %d tries", what, tries + 1)
        return written
