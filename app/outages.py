"""Whether an error means a backing service is out of reach (down, restarting, failing over, its pool
exhausted) rather than that the work or the statement is wrong: what waits an outage out (a delivery's
retries, a stream reader) must not also wait out a real bug.

`OperationalError` alone is too wide for that: it also covers a statement timeout, a deadlock, a lock
not available, and on SQLite a missing table. Only a connection that failed or was lost counts. A
missing table is told apart too (`schema_missing`): a setup error, for readiness and the API to name.
"""

from __future__ import annotations

import psycopg
import psycopg.errors
import redis
import sqlalchemy.exc

_SERVER_GOING_AWAY = frozenset({"57P01", "57P02", "57P03", "53300"})
"""PostgreSQL's admin shutdown, crash shutdown, cannot connect now (starting up), too many connections."""


def is_outage(error: BaseException) -> bool:
    if isinstance(error, redis.AuthenticationError):
        return False
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError, sqlalchemy.exc.TimeoutError)):
        return True
    if isinstance(error, sqlalchemy.exc.DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        return state is None or state.startswith("08") or state in _SERVER_GOING_AWAY
    return False


def schema_missing(error: BaseException) -> bool:
    """A query that failed because agentq's tables are not there: a database never initialised, or (on the
    SQLite default, a path relative to the working directory) a process started in another directory,
    which then opens an empty file. A setup error, to be said as such rather than as a brief outage."""
    if not isinstance(error, sqlalchemy.exc.DBAPIError):
        return False
    if isinstance(error.orig, psycopg.errors.UndefinedTable):
        return True
    return isinstance(error, sqlalchemy.exc.OperationalError) and "no such table" in str(error.orig)
